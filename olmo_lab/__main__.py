"""The command line: `python -m olmo_lab` (installed as `olmo-lab`).

    olmo-lab generate "def add(a, b):" --max-new-tokens 20
    echo "The king said" | olmo-lab generate --stream      # prompts from standard input, one per line
    olmo-lab route "The integral of x^2 is"          # routing table of a FlexOlmo model
    olmo-lab toggle "The integral of x^2 is" --off math
    olmo-lab info flexolmo-lab                       # config, experts, parameters, bytes, layer types

The model is the embedded lab model unless --model names another lab model, a directory or a hub repo
id. With no prompt (or `-`), every non-empty line of standard input is a prompt of its own.
Bad arguments print the usage and exit with status 2; a problem with the model or input prints one
line and exits with status 1; never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from contextlib import nullcontext

import torch

from . import __version__
from .errors import InputError, OlmoLabError

DEFAULT_MODELS = {"generate": "olmo3-lab", "route": "flexolmo-lab", "toggle": "flexolmo-lab"}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="olmo-lab", description="OLMo 3 and FlexOlmo, layer by layer.")
    p.add_argument("--version", action="version", version=f"olmo-lab {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="{generate,route,toggle,info}")

    def common(q):
        q.add_argument("prompt", nargs="?", default="-",
                       help="the text to continue; none, or '-', reads standard input: one prompt per line")
        q.add_argument("--model", help="lab model name, checkpoint directory or hub repo id (default: the "
                                       "embedded lab model)")
        q.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
        q.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1, mps")
        q.add_argument("--revision", help="hub branch, tag or commit (hub repo ids only)")
        q.add_argument("--max-new-tokens", type=int, default=20)

    g = sub.add_parser("generate", help="continue a prompt")
    common(g)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int)
    g.add_argument("--top-p", type=float)
    g.add_argument("--seed", type=int)
    g.add_argument("--off", default="", help="comma-separated experts to opt out (FlexOlmo)")
    g.add_argument("--stream", action="store_true", help="print the tokens as they are generated")
    r = sub.add_parser("route", help="print which experts each token is routed to")
    common(r)
    t = sub.add_parser("toggle", help="compare the output with some experts off")
    common(t)
    t.add_argument("--off", required=True, help="comma-separated expert names or indices to switch off")
    t.add_argument("--mode", choices=["opt_out", "drop"], default="opt_out")
    i = sub.add_parser("info", help="print a checkpoint's config, experts, parameter and byte counts, layer types")
    i.add_argument("path", help="lab model name, checkpoint directory or hub repo id")
    i.add_argument("--revision", help="hub branch, tag or commit (hub repo ids only)")
    return p


def _experts(spec: str) -> list:
    return [int(x) if x.strip().isdigit() else x.strip() for x in spec.split(",") if x.strip()]


def prompts(arg: str, stdin) -> list[str]:
    """The prompt given, or for '-' every non-empty line of standard input (without its line break)."""
    if arg != "-":
        return [arg]
    lines = [line.rstrip("\r\n") for line in stdin]
    lines = [line for line in lines if line.strip()]
    if not lines:
        raise InputError("no prompt: give one as an argument or pipe lines into standard input")
    return lines


def run(args, out) -> None:
    """Carry out one parsed command, writing what it prints to `out`."""
    from .session import Lab

    if args.command == "info":
        from .checkpoints.summary import describe
        print(describe(args.path, args.revision), file=out)
        return
    texts = prompts(args.prompt, sys.stdin)
    lab = Lab(args.model or DEFAULT_MODELS[args.command], dtype=args.dtype, device=args.device,
              revision=args.revision)
    for prompt in texts:
        if args.command == "generate":
            generate_text(lab, prompt, args, out)
        else:
            print(inspect(lab, prompt, args), file=out)


def generate_text(lab, prompt: str, args, out) -> None:
    """The prompt and its continuation, whole or (--stream) piece by piece as the tokens come."""
    from .modeling.experts import experts_off

    off = _experts(args.off)
    with experts_off(lab.model, off) if off else nullcontext():
        result = lab.generate(prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              top_k=args.top_k, top_p=args.top_p, seed=args.seed, stream=args.stream)
        pieces = result if args.stream else [result]
        print(prompt, end="", file=out, flush=True)
        for piece in pieces:
            print(piece, end="", file=out, flush=True)
        print(file=out)


def inspect(lab, prompt: str, args) -> str:
    """`route` and `toggle`: the routing table, or the output with some experts off."""
    from .modeling.experts import experts_off

    model, tok = lab.model, lab.tokenizer
    if not model.config.is_moe:
        raise OlmoLabError(f"{args.command}: this is a dense {model.config.model_type} model; "
                           "routing and toggles need a FlexOlmo checkpoint")
    if args.command == "route":
        with lab.trace(attention=False) as tr:
            lab.generate(prompt, max_new_tokens=args.max_new_tokens)
        names = model.config.expert_names
        layers = sorted(tr.routing)
        lines = [f"{'token':<16}" + "".join(f"{'layer ' + str(l):>16}" for l in layers)]
        for i, token in enumerate(tr.tokens):
            cells = [f"{names[tr.routing[l].topk_indices[i, 0]]} {tr.routing[l].topk_weights[i, 0].item():.2f}"
                     for l in layers]
            lines.append(f"{token!r:<16}" + "".join(f"{c:>16}" for c in cells))
        return "\n".join(lines)
    off = _experts(args.off)
    base = lab.generate(prompt, max_new_tokens=args.max_new_tokens)
    ids = torch.tensor([tok.encode(prompt)], device=model.device)
    with torch.inference_mode():
        before = model(ids).logits[0, -1].float().softmax(-1)
        with experts_off(model, off, mode=args.mode):
            toggled = lab.generate(prompt, max_new_tokens=args.max_new_tokens)
            after = model(ids).logits[0, -1].float().softmax(-1)
    from .analysis.plots import distribution_summary
    labels = tok.token_strings(list(range(min(len(tok), len(before)))))
    n = len(labels)
    return "\n".join([f"all experts      : {prompt + base!r}",
                      f"{', '.join(map(str, off))} off ({args.mode}): {prompt + toggled!r}",
                      distribution_summary(before[:n], after[:n], labels)])


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)  # exits with status 2 and the usage on bad arguments
    if getattr(args, "max_new_tokens", 0) < 0:
        parser.error("--max-new-tokens must be >= 0")
    if getattr(args, "prompt", None) == "-" and sys.stdin.isatty():
        parser.error("the prompt is missing: give it as an argument or pipe it into standard input")
    try:
        run(args, sys.stdout)
    except (OlmoLabError, ValueError, OSError) as e:  # every bad input is an OlmoLabError, checked before work
        print(f"olmo-lab: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("olmo-lab: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 -- a bug, still one line: the promise is never a traceback
        print(f"olmo-lab: error: unexpected {type(e).__name__}: {e} (please report this)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
