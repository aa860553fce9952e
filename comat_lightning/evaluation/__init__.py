"""Standard benchmarks' scoring rules (T2I-CompBench, GenEval), re-implemented from their official code."""
