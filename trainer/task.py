"""Training entrypoint: `python -m trainer.task --flags`.

The only place training flags are defined: one flag per `Config` field, with
the field's help text and choices. `--preset=NAME` (or `--flagfile=configs/NAME.flags`)
loads a preset; flags after it override it. Also accepts `--job-dir`, the way
legacy AI Platform passes its jobDir.
"""

from __future__ import annotations

import dataclasses

from absl import flags, logging

from trainer import cli, config
from trainer.config import Config
from trainer.errors import UserError
from trainer.training import cloud


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines one flag per Config field, plus --preset, on `flag_values`."""
    helps, choices = config.field_help(), config.field_choices()
    for field in dataclasses.fields(Config):
        name, default, text = field.name, field.default, helps[field.name]
        if name in choices:
            flags.DEFINE_enum(name, default, choices[name], text, flag_values=flag_values)
        elif isinstance(default, bool):
            flags.DEFINE_bool(name, default, text, flag_values=flag_values)
        elif isinstance(default, int):
            flags.DEFINE_integer(name, default, text, flag_values=flag_values)
        elif isinstance(default, float):
            flags.DEFINE_float(name, default, text, flag_values=flag_values)
        else:
            flags.DEFINE_string(name, default, text, flag_values=flag_values)
    flags.DEFINE_string("preset", None, "A preset from configs/ by name (seed, cpu, gpu, ...); "
                        "same as --flagfile=configs/NAME.flags.", flag_values=flag_values)


def config_from_flags(flag_values: flags.FlagValues) -> Config:
    """Builds and validates the Config, filling outputs from the cloud service's env vars."""
    cfg = Config(**{f.name: flag_values[f.name].value for f in dataclasses.fields(Config)})
    return cloud.apply_environment(cfg).validate()


def parse_flags(argv: list[str]) -> Config:
    """Parses a full argv (argv[0] is the program) on fresh flags; raises UserError."""
    flag_values = flags.FlagValues()
    define_flags(flag_values)
    try:
        flag_values(rewrite_argv(list(argv)))
    except flags.Error as err:
        raise UserError(str(err).splitlines()[0]) from err
    return config_from_flags(flag_values)


def rewrite_argv(argv: list[str]) -> list[str]:
    """Presets and legacy spellings (--job-dir) -> what absl parses."""
    return cloud.normalize_argv(config.expand_presets(argv))


def run(flag_values: flags.FlagValues) -> None:
    """Trains per the parsed flags, printing a `done:` line with the last metrics."""
    if not flag_values["verbosity"].present:  # -v=1 (debug) and the like win.
        logging.set_verbosity(logging.INFO)
    from trainer.training import train  # Import late: --helpshort should not wait for TensorFlow.

    # TensorFlow's own INFO lines (e.g. one per checkpoint shard) drown the epoch lines.
    train.tf.get_logger().setLevel("WARNING")
    logging.get_absl_handler().addFilter(
        lambda record: not record.getMessage().startswith("Sharding callback duration"))
    summary = train.train(config_from_flags(flag_values))
    if summary:
        print("done: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                   for k, v in summary.items()))


if __name__ == "__main__":
    cli.main(define_flags, run, rewrite_argv)
