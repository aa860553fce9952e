"""Progress bars that count generator steps: ``Step 120/5000`` with the main losses beside it.

Lightning's bars count the batches of the current epoch; a CoMat run is sized in generator steps
(``trainer.max_steps``) and usually spans many short epochs over a small prompt file, so a per-epoch bar says
little. These bars show the generator step and its total across epochs (a resumed run starts where it stopped);
validation, test and predict bars are Lightning's own. :meth:`CoMatModule.configure_callbacks` puts them in place
of Lightning's default bar (Rich when installed, else tqdm); a bar you configure yourself is left alone.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar


def _generator_step(trainer) -> int:
    return int(getattr(trainer.lightning_module, "generator_step", trainer.global_step))


class _CountsGeneratorSteps:
    @property
    def total_train_batches(self):
        # max_steps counts generator steps (the module steps the discriminator's optimizer outside Lightning's count).
        max_steps = self.trainer.max_steps
        return max_steps if max_steps is not None and max_steps > 0 else super().total_train_batches

    def _description(self, trainer) -> str:
        return f"Step (epoch {trainer.current_epoch})"


class GeneratorStepProgressBar(_CountsGeneratorSteps, TQDMProgressBar):
    def on_train_epoch_start(self, trainer, *args) -> None:
        super().on_train_epoch_start(trainer, *args)
        bar = self.train_progress_bar
        bar.n = _generator_step(trainer)
        bar.set_description(self._description(trainer))
        bar.refresh()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = _generator_step(trainer)
        bar = self.train_progress_bar
        if bar is not None and self._should_update(step, bar.total or 0):
            if not bar.disable:
                bar.n = step
                bar.refresh()
            bar.set_postfix(self.get_metrics(trainer, pl_module))


class GeneratorStepRichProgressBar(_CountsGeneratorSteps, RichProgressBar):
    def _get_train_description(self, current_epoch: int) -> str:
        return self._description(self.trainer)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self._update(self.train_progress_bar_id, _generator_step(trainer))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.is_disabled and self.train_progress_bar_id is None:  # resumed mid-epoch
            self._initialize_train_progress_bar_id()
        self._update(self.train_progress_bar_id, _generator_step(trainer))
        self._update_metrics(trainer, pl_module)
        self.refresh()


def generator_step_bar(bar):
    """The generator-step version of Lightning's default bar ``bar``, or None for any other (or no) bar."""
    if type(bar) is TQDMProgressBar:
        return GeneratorStepProgressBar(refresh_rate=bar.refresh_rate, process_position=bar.process_position, leave=bar._leave)
    if type(bar) is RichProgressBar:
        return GeneratorStepRichProgressBar(refresh_rate=bar.refresh_rate, leave=bar._leave, theme=bar.theme, console_kwargs=bar._console_kwargs)
    return None


__all__ = ["GeneratorStepProgressBar", "GeneratorStepRichProgressBar", "generator_step_bar"]
