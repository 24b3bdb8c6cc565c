"""The library's error types: every error it raises about bad input is a ``MeLoRAError``.

    try:
        run(...)
    except MeLoRAError as e:     # bad data, settings, checkpoint, or a numerical fault in training
        print(e)

``MeLoRAError`` subclasses ``ValueError``, so code that caught ``ValueError`` keeps working. The
subclasses live next to the code that raises them: ``ConfigError`` (here: a bad ``MeLoRAConfig`` /
``TrainConfig`` value or key, a target module the base model lacks), ``data.DatasetError`` (a bad
dataset file or row, a prompt that cannot fit, label strings that share a token),
``runs.RunError`` (run settings, TOML files, run directories), ``io.CheckpointError`` (an adapter or
training checkpoint that is missing, damaged or does not fit the model) and
``train.NumericalError`` (a NaN or inf in training; also a ``RuntimeError``).
"""


class MeLoRAError(ValueError):
    """Base of every error melora-pyro raises about its input; the message says what was expected."""


class ConfigError(MeLoRAError):
    """A configuration value out of range, of the wrong type, or an unknown key."""
