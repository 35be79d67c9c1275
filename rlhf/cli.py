"""`rlhf <command> [--config FILE.yaml] [--key value ...]`: every stage from the command line.

Imports stay inside the commands, so `rlhf --help` starts without loading torch or transformers.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import sys

COMMANDS = {
    "sft": ("rlhf.sft", "supervised fine-tuning on demonstrations (--data demonstrations.jsonl)"),
    "pairs": ("rlhf.pairs", "sample responses and have the annotator choose → preference pairs (--data prompts.jsonl)"),
    "reward": ("rlhf.reward", "train a Bradley–Terry reward model (--data pairs.jsonl)"),
    "ppo": ("rlhf.ppo", "PPO with a KL penalty against the reward model (--data prompts.jsonl)"),
    "grpo": ("rlhf.grpo", "GRPO: k answers per prompt, group baselines, no critic (--reward_fn FILE.py:fn and/or "
                          "--reward_model DIR; --advantage dr_grpo|rloo|reinforce_pp)"),
    "dpo": ("rlhf.dpo", "DPO / IPO / cDPO / SimPO on preference pairs, no reward model (--data pairs.jsonl)"),
    "pipeline": ("rlhf.pipeline", "SFT → pairs → reward → PPO → evaluation in one run folder"),
    "eval": ("rlhf.evaluate", "held-out gold and reward-model score, win rate, KL, length, repetition, refusals "
                              "(--models a,b)"),
    "report": ("rlhf.report", "one self-contained HTML page of a run: curves, before/after, answers "
                              "(rlhf report RUN_DIR)"),
    "study": ("rlhf.study", "kl-sweep: PPO at several β; critic-free: PPO, GRPO, Dr. GRPO, RLOO compared; both "
                            "from one SFT + reward model (--run_dir RUN)"),
    "chat": ("rlhf.chat", "talk to a checkpoint in the terminal (--model DIR)"),
    "annotate": ("rlhf.annotate.cli", "the preference-annotation web app: import, serve, add-user, export"),
    "label": ("rlhf.label", "AI labels: a judge chooses between responses → preference pairs "
                            "(--judge J --data candidates.jsonl --out prefs.jsonl)"),
    "serve": ("rlhf.serve", "an OpenAI-compatible chat-completions server for a checkpoint "
                            "(rlhf serve MODEL_DIR --port P)"),
    "constitutional": ("rlhf.constitutional", "Constitutional AI: revise → SFT → AI preferences → DPO/PPO "
                                              "(subcommands: revise, prefs, eval)"),
}

USAGE = """usage: rlhf <command> [--config FILE.yaml] [--key value ...]

The RLHF pipeline, offline on a laptop CPU or on a GPU with the same code.

commands:
{commands}

Every command takes --config FILE.yaml (its keys, or a section named after the command), overrides
as --key value (pipeline sections as --ppo.lr 1e-5), --output_dir DIR, and its input as --data FILE.
With no --model, the embedded SmolLM2-135M-Instruct is used. `rlhf <command> --help` lists the keys.
"""


def usage() -> str:
    return USAGE.format(commands="\n".join(f"  {name:<10} {text}" for name, (_, text) in COMMANDS.items()))


PIPELINE_STAGES = ("sft", "pairs", "reward", "ppo", "dpo", "eval")


def file_values(command: str, cls: type, path: str) -> dict:
    """The keys a stage takes from a --config file: a flat file's keys, or from a sectioned file (a pipeline's) the
    stage's own section on top of the top-level keys that the stage has. A pipeline stage reads a pipeline file the
    way the pipeline would run it (its wiring: `rlhf reward --config run.yaml` trains on that run's pairs). A key
    that applies to nothing is an error naming the closest key."""
    from rlhf import config as cfg

    data = cfg.read_yaml(path)
    section_name = command.split()[-1]
    if command == "pipeline":
        return data
    fields = {f.name for f in dataclasses.fields(cls)}
    sectioned = {k for k, v in data.items() if isinstance(v, dict) and k not in fields}
    if not sectioned:
        return data  # flat: every key must be one of the stage's (cfg.build says which is not)
    if section_name in PIPELINE_STAGES and sectioned <= set(PIPELINE_STAGES):  # a pipeline's file: its wiring
        from rlhf import pipeline

        try:
            run = cfg.build(pipeline.Config, data, where=path)
        except cfg.ConfigError as e:
            raise cfg.ConfigError(str(e).replace(f"{path}: ", f"{path} (a pipeline file): ", 1)) from None
        if section_name == "dpo" and run.method == "ppo":
            run.method = "both"
        if section_name == "reward" and run.method == "dpo":
            run.method = "both"
        built = pipeline.stage_configs(run).get(section_name)
        if built is not None:
            return json.loads(json.dumps(cfg.to_dict(built), default=str))
    known = set(fields) | sectioned
    for key in data:
        if key not in known:
            raise cfg._unknown_key(key, sorted(fields), f"{path}")
    section = data.get(section_name)
    shared = {k: v for k, v in data.items() if k in fields and k not in sectioned}
    return {**shared, **(section if isinstance(section, dict) else {})}


def parse_stage_args(command: str, cls: type, argv: list[str]):
    """--config FILE (flat keys, or the command's own section of a pipeline file with its top-level keys) +
    --key value overrides.

    For `rlhf constitutional revise` the section is the subcommand's (`revise`).
    """
    from rlhf import config as cfg

    values: dict = {}
    rest = []
    i = 0
    while i < len(argv):
        if argv[i] == "--config" and i + 1 < len(argv) or argv[i].startswith("--config="):
            path = argv[i].split("=", 1)[1] if "=" in argv[i] else argv[i + 1]
            values.update(file_values(command, cls, path))
            i += 1 if "=" in argv[i] else 2
        else:
            rest.append(argv[i])
            i += 1
    overrides = cfg.overrides_to_dict(rest)
    if command == "eval" and "model" in overrides:  # `rlhf eval --model DIR` reads naturally too
        overrides["models"] = overrides.pop("model")
    values = cfg.merge_nested(values, overrides)
    return cfg.build(cls, values, where=f"rlhf {command}")


def main(argv: list[str] | None = None) -> int:
    code = run_command(list(sys.argv[1:] if argv is None else argv))
    if "rlhf.distributed" in sys.modules:  # a stage ran: under torchrun its process ends here (see exit_now_if_left)
        from rlhf import distributed

        distributed.exit_now_if_left(code)
    return code


def run_command(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(command, list(COMMANDS), n=1)
        print(f"rlhf: unknown command '{command}'." + (f" Did you mean '{close[0]}'?" if close else ""),
              file=sys.stderr)
        print(usage(), file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    if command == "annotate":
        return module.main(rest)
    from rlhf import config as cfg
    from rlhf.data import DataError

    config_cls, run = module.Config, module.main
    subcommands = getattr(module, "SUBCOMMANDS", {})  # `rlhf constitutional revise ...`: (Config, function)
    if rest and rest[0] in subcommands:
        command = f"{command} {rest[0]}"
        config_cls, run = subcommands[rest.pop(0)]
    positional = getattr(module, "POSITIONAL", "")  # `rlhf serve MODEL_DIR` means `--model MODEL_DIR`
    if positional and rest and not rest[0].startswith("-"):
        rest = [f"--{positional}", *rest]
    if "-h" in rest or "--help" in rest:
        print(f"usage: rlhf {command} [--config FILE.yaml] [--key value ...]\n\n"
              f"{COMMANDS[command.split()[0]][1]}\n\nkeys:")
        print(cfg.describe(config_cls))
        if subcommands and " " not in command:
            print(f"\nsubcommands: {', '.join(subcommands)} (rlhf {command} SUBCOMMAND --help)")
        return 0
    from rlhf import distributed
    from rlhf.checkpoint import StageInterrupted

    try:
        config = parse_stage_args(command, config_cls, rest)
        from rlhf.hardware import keep_freed_memory

        keep_freed_memory()
        run(config)
        distributed.stop()
    except (cfg.ConfigError, DataError, FileNotFoundError, distributed.SettingError) as e:  # the same on every
        # process: rank 0 says it
        if distributed.is_main():
            print(f"rlhf {command}: error: {' '.join(str(e).split()).removeprefix(f'rlhf {command}: ')}",
                  file=sys.stderr)
        return 2
    except ValueError as e:  # under torchrun maybe one process's own: it says which (torchrun stops the others)
        where = f" (process {distributed.rank()} of {distributed.world_size()})" if distributed.world_size() > 1 else ""
        print(f"rlhf {command}: error{where}: {' '.join(str(e).split()).removeprefix(f'rlhf {command}: ')}",
              file=sys.stderr)
        return 2
    except StageInterrupted as e:  # every process stopped after the same step: leave the process group together,
        # since exiting with it still up can abort in gloo's threads (exit code -6 rather than 128 + the signal)
        distributed.stop()
        print(f"\nrlhf {command}: {e}", file=sys.stderr)
        return 128 + e.signal_number
    except KeyboardInterrupt:
        print(f"\nrlhf {command}: interrupted; finished checkpoints are intact (each is written to a temp folder, "
              f"then renamed; a half-replaced one is put back by the next run)", file=sys.stderr)
        return 130
    except OSError as e:  # a full disk, a read-only folder: say which file, without a traceback
        print(f"rlhf {command}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
