"""The training module (CoMatModule), the loss contract, options and start-up checks."""
