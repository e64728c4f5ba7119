"""`nds evaluate`: pre-train on each strategy's selection, fine-tune on a target task, compare."""

from __future__ import annotations

from pathlib import Path

from nds.config import Workspace
from nds.errors import NDSError
from nds.models.device import DEVICE_HELP, apply_device_option, device_argument


def _cmd_evaluate(args) -> int:
    from pydantic import ValidationError

    from nds.evaluate.fit import budget_answer_lines, fits_from_dict, load_fits
    from nds.evaluate.request import EvaluateRequest, quick_request

    if args.from_dir:
        if args.target_accuracy is None:
            raise NDSError("--from needs --target-accuracy (what budget reaches accuracy X?)")
        fits, meta = load_fits(args.from_dir)
        for line in budget_answer_lines(fits, args.target_accuracy, n_source=int(meta["n_source"])):
            print(line)
        return 0
    fields = {k: v for k, v in {
        "tasks": args.task, "budgets": args.budget, "strategies": args.strategy, "shots": args.shots,
        "seeds": list(range(args.seeds)) if args.seeds is not None else None, "temperature": args.temperature,
        "scorer": args.scorer,
        "train_dir": args.train, "test_dir": args.test, "out_dir": str(Path(args.out).resolve()) if args.out else None,
    }.items() if v is not None}
    if args.train:
        fields.setdefault("tasks", [])
    try:
        request = quick_request(**fields) if args.quick else EvaluateRequest(**fields)
        if args.pretrain_steps or args.finetune_steps or args.finetune_mode:
            request.train = request.train.model_copy(update={k: v for k, v in {
                "pretrain_steps": args.pretrain_steps, "finetune_steps": args.finetune_steps,
                "finetune_mode": args.finetune_mode}.items() if v})
    except ValidationError as exc:
        first = exc.errors()[0]
        raise NDSError(f"--{'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    from flows.evaluate import evaluate

    apply_device_option(args.device)  # pre-training, fine-tuning and scoring read $NDS_DEVICE
    ws = Workspace.from_env(args.root)
    summary = evaluate(request, str(ws.root), progress=not args.quiet)
    print(summary["markdown"])
    print(f"evaluation {summary['evaluation_id']}: {summary['rows']} runs -> {summary['out_dir']}")
    print(f"plot {summary['paths']['plot']}")
    if args.target_accuracy is not None:
        fits = fits_from_dict(summary["fits"])
        if not fits:
            print("no log-linear fit: measure nds or uniform at >= 2 budgets to predict a budget")
        for line in budget_answer_lines(fits, args.target_accuracy, n_source=summary["n_source"]):
            print(line)
    return 0


def add_commands(sub) -> None:
    from nds._registry import EVAL_STRATEGIES, SCORERS
    from nds.evaluate.tasks import TASKS

    ev = sub.add_parser("evaluate", help="pre-train on each strategy's selection, fine-tune on a target, compare")
    ev.add_argument("--task", action="append",
                    help=f"built-in target task (repeatable): {', '.join(TASKS)} (digits-m, lcd-digits, icons and "
                    "nebulae come from collections outside the source)")
    ev.add_argument("--train", help="your own labelled train ImageFolder (with --test) instead of --task")
    ev.add_argument("--test", help="your own labelled test ImageFolder")
    ev.add_argument("--budget", action="append", type=float, help="count or fraction of the source (repeatable)")
    ev.add_argument("--strategy", action="append", choices=EVAL_STRATEGIES.names(),
                    help="(repeatable; default: every strategy)")
    ev.add_argument("--seeds", type=int, help="number of seeds (0..N-1; default 3)")
    ev.add_argument("--shots", type=int, help="train images per class of a built-in task (default 10)")
    ev.add_argument("--temperature", type=float, help="selection temperature (default: the server's)")
    ev.add_argument("--scorer", choices=SCORERS.names(),
                    help="how the nds strategy scores the experts (default: what `nds client score` uses without "
                    "--mode: combined where the bundle ships cluster_stats, else rotation)")
    ev.add_argument("--pretrain-steps", type=int,
                    help="cap of pre-training steps (each selection trains 30 epochs within [300, cap] steps)")
    ev.add_argument("--finetune-steps", type=int)
    ev.add_argument("--finetune-mode", choices=["all", "last"], help="fine-tune every layer or head + last block")
    ev.add_argument("--device", type=device_argument, help=DEVICE_HELP)
    ev.add_argument("--quick", action="store_true", help="tiny smoke profile: 1 task, 1 seed, 2 budgets, short training")
    ev.add_argument("--out", help="output folder (default: evaluations/<evaluation id>)")
    ev.add_argument("--target-accuracy", type=float, help="also print the budget predicted to reach this accuracy")
    ev.add_argument("--from", dest="from_dir", help="answer --target-accuracy from a finished evaluation folder")
    ev.set_defaults(func=_cmd_evaluate)
