"""The command line: `python -m olmo_lab` (installed as `olmo-lab`).

    olmo-lab generate "def add(a, b):" --max-new-tokens 20
    olmo-lab route "The integral of x^2 is"          # routing table of a FlexOlmo model
    olmo-lab toggle "The integral of x^2 is" --off math

The model is the embedded lab model unless --model names a directory or a hub repo id.
Bad arguments print the usage and exit with status 2; a problem with the model or input prints one
line and exits with status 1; never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from contextlib import nullcontext

import torch

from .errors import OlmoLabError

DEFAULT_MODELS = {"generate": "olmo3-lab", "route": "flexolmo-lab", "toggle": "flexolmo-lab"}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="olmo-lab", description="OLMo 3 and FlexOlmo, layer by layer.")
    sub = p.add_subparsers(dest="command", required=True, metavar="{generate,route,toggle}")

    def common(q):
        q.add_argument("prompt", help="the text to continue")
        q.add_argument("--model", help="checkpoint directory or hub repo id (default: the embedded lab model)")
        q.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
        q.add_argument("--max-new-tokens", type=int, default=20)

    g = sub.add_parser("generate", help="continue a prompt")
    common(g)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int)
    g.add_argument("--top-p", type=float)
    g.add_argument("--seed", type=int)
    g.add_argument("--off", default="", help="comma-separated experts to opt out (FlexOlmo)")
    r = sub.add_parser("route", help="print which experts each token is routed to")
    common(r)
    t = sub.add_parser("toggle", help="compare the output with some experts off")
    common(t)
    t.add_argument("--off", required=True, help="comma-separated expert names or indices to switch off")
    t.add_argument("--mode", choices=["opt_out", "drop"], default="opt_out")
    return p


def _experts(spec: str) -> list:
    return [int(x) if x.strip().isdigit() else x.strip() for x in spec.split(",") if x.strip()]


def _load(args):
    from .checkpoint import load_model
    from .tokenizer import load_tokenizer

    path = args.model
    if path is None:
        from .lab import lab_model
        path = lab_model(DEFAULT_MODELS[args.command])
    return load_model(path, dtype=args.dtype), load_tokenizer(path)


def run(args) -> str:
    """Carry out one parsed command; returns the text to print."""
    from .experts import experts_off
    from .generate import generate
    from .trace import trace

    model, tok = _load(args)
    if args.command == "generate":
        off = _experts(args.off)
        with experts_off(model, off) if off else nullcontext():
            return args.prompt + generate(model, tok, args.prompt, max_new_tokens=args.max_new_tokens,
                                          temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                          seed=args.seed)
    if not model.config.is_moe:
        raise OlmoLabError(f"{args.command}: this is a dense {model.config.model_type} model; "
                           "routing and toggles need a FlexOlmo checkpoint")
    if args.command == "route":
        with trace(model, attention=False, tokenizer=tok) as tr:
            generate(model, tok, args.prompt, max_new_tokens=args.max_new_tokens)
        names = model.config.expert_names
        layers = sorted(tr.routing)
        lines = [f"{'token':<16}" + "".join(f"{'layer ' + str(l):>16}" for l in layers)]
        for i, token in enumerate(tr.tokens):
            cells = [f"{names[tr.routing[l].topk_indices[i, 0]]} {tr.routing[l].topk_weights[i, 0].item():.2f}"
                     for l in layers]
            lines.append(f"{token!r:<16}" + "".join(f"{c:>16}" for c in cells))
        return "\n".join(lines)
    off = _experts(args.off)
    base = generate(model, tok, args.prompt, max_new_tokens=args.max_new_tokens)
    ids = torch.tensor([tok.encode(args.prompt)])
    with torch.inference_mode():
        before = model(ids).logits[0, -1].float().softmax(-1)
        with experts_off(model, off, mode=args.mode):
            toggled = generate(model, tok, args.prompt, max_new_tokens=args.max_new_tokens)
            after = model(ids).logits[0, -1].float().softmax(-1)
    from .plots import distribution_summary
    labels = tok.token_strings(list(range(min(len(tok), len(before)))))
    n = len(labels)
    return "\n".join([f"all experts      : {args.prompt + base!r}",
                      f"{', '.join(map(str, off))} off ({args.mode}): {args.prompt + toggled!r}",
                      distribution_summary(before[:n], after[:n], labels)])


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)  # exits with status 2 and the usage on bad arguments
    if args.max_new_tokens < 0:
        parser.error("--max-new-tokens must be >= 0")
    try:
        print(run(args))
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
