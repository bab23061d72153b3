"""Rendering a chat template: untrusted checkpoint data, run in a bounded Jinja sandbox.

The environment is set up like transformers' one (`trim_blocks`, `lstrip_blocks`, a `tojson` without
HTML escaping, `raise_exception`, `strftime_now`), so the text is byte-identical to what the model was
trained on. On top of Jinja's immutable sandbox (no Python internals, ranges of at most 100,000),
rendering is bounded: at most `MAX_CHARS` characters of output or of any string or list a template
builds (`*`, `**`, `%` and calls with huge sizes are refused before they run), at most `MAX_STEPS`
template lines executed, and every exception a template can raise (division by zero, recursion, ...)
becomes one `TokenizerError`. Caller variables may not shadow the names the template is given.
"""

from __future__ import annotations

import json
import re
import sys
from datetime import datetime

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import TokenizerError

MAX_CHARS = 2**24  # 16M characters: far beyond any context window's worth of text
MAX_STEPS = 2_000_000  # template lines executed; a long real conversation takes a few thousand
_HUGE_NUMBER = re.compile(r"\d{9,}")  # a width or precision of 100M+ in a %-format


class _Refused(Exception):
    """A bound was hit while rendering."""


def _too_big(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_CHARS


def _check_size(result):
    if isinstance(result, (str, bytes, list, tuple)) and len(result) > MAX_CHARS:
        raise _Refused(f"it built a value of {len(result)} items (at most {MAX_CHARS})")
    return result


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox, refusing operations that make a huge value from small inputs."""

    intercepted_binops = frozenset(["+", "*", "**", "%"])

    def call_binop(self, context, operator, left, right):
        if operator == "*" and isinstance(left, (str, list, tuple)) is not isinstance(right, (str, list, tuple)):
            seq, times = (left, right) if isinstance(left, (str, list, tuple)) else (right, left)
            if isinstance(times, int) and len(seq) * max(times, 0) > MAX_CHARS:
                raise _Refused(f"it repeats a value of length {len(seq)} {times} times (at most {MAX_CHARS} items)")
        if operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1 \
                and right * abs(left).bit_length() > 4 * MAX_CHARS:
            raise _Refused(f"it raises {left} to the power {right}")
        if operator == "+" and isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)) \
                and len(left) + len(right) > MAX_CHARS:
            raise _Refused(f"it builds a value of {len(left) + len(right)} items (at most {MAX_CHARS})")
        if operator == "%" and isinstance(left, str) and _HUGE_NUMBER.search(left):
            raise _Refused("it formats with a width or precision of 100 million or more")
        return _check_size(super().call_binop(context, operator, left, right))

    def wrap_str_format(self, value):  # "...".format / format_map, as the template reads the attribute
        wrapped = super().wrap_str_format(value)
        if wrapped is not None and _HUGE_NUMBER.search(value.__self__):
            def refuse(*args, **kwargs):
                raise _Refused("it formats with a width or precision of 100 million or more")
            return refuse
        return wrapped

    def call(self, __context, __obj, *args, **kwargs):
        sizes = isinstance(getattr(__obj, "__self__", None), (str, bytes, list, tuple)) \
            or getattr(__obj, "__name__", "") == "safe_range"  # "a".ljust(n), range(n): n is a size
        if sizes and any(_too_big(a) for a in (*args, *kwargs.values())):
            raise _Refused(f"it calls {getattr(__obj, '__name__', 'a function')} with a size beyond {MAX_CHARS}")
        return _check_size(super().call(__context, __obj, *args, **kwargs))


def _bounded_join(join):
    """`join` (the filter, or the runtime's `~` operator) refusing to build a string beyond MAX_CHARS."""
    def bounded(*args, **kwargs):
        items = next((a for a in args if isinstance(a, (list, tuple))), ())
        if sum(len(x) for x in items if isinstance(x, str)) > MAX_CHARS:
            raise _Refused(f"it joins strings into more than {MAX_CHARS} characters")
        return _check_size(join(*args, **kwargs))
    return _like(bounded, join)


def _like(wrapper, f):
    """`wrapper` with `f`'s name and Jinja's pass_context / pass_eval_context marker, which must survive."""
    if hasattr(f, "jinja_pass_arg"):
        wrapper.jinja_pass_arg = f.jinja_pass_arg
    wrapper.__name__ = getattr(f, "__name__", "filter")
    return wrapper


def _bounded_filter(f):
    """A filter that refuses size arguments beyond MAX_CHARS (`center(10**10)`) and oversized results."""
    params = 2 if hasattr(f, "jinja_pass_arg") else 1  # after the context (if passed) and the value

    def bounded(*args, **kwargs):
        if any(_too_big(a) for a in (*args[params:], *kwargs.values())):
            raise _Refused(f"its filter {f.__name__} was given a size beyond {MAX_CHARS}")
        if f.__name__ == "do_format" and any(isinstance(a, str) and _HUGE_NUMBER.search(a) for a in args[:1]):
            raise _Refused("it formats with a width or precision of 100 million or more")
        return _check_size(f(*args, **kwargs))
    return _like(bounded, f)


def chat_environment() -> ImmutableSandboxedEnvironment:
    """A bounded sandboxed Jinja environment set up like transformers' one for chat templates."""
    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = _BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.filters["join"] = _bounded_join(env.filters["join"])
    env.filters = {name: _bounded_filter(f) for name, f in env.filters.items()}
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def render_chat_template(template: str, source: str, **variables) -> str:
    """The text of `template` rendered with `variables`; TokenizerError (naming `source`) for any failure."""
    env = chat_environment()
    try:
        compiled = env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as err:
        raise TokenizerError(f"{source}: the chat template is not valid Jinja (line {err.lineno}): "
                             f"{err.message}") from None
    except Exception as err:  # noqa: BLE001 -- compiling untrusted text: any failure is the template's
        raise TokenizerError(f"{source}: the chat template cannot be compiled ({type(err).__name__}: {err})") from None
    runtime = compiled.root_render_func.__globals__  # what the compiled code calls for `~`: bounded too
    for name in ("str_join", "markup_join"):
        runtime[name] = _bounded_join(runtime[name])
    pieces, size = [], 0
    try:
        with _step_budget(MAX_STEPS):
            for piece in compiled.generate(**variables):
                size += len(piece)
                if size > MAX_CHARS:
                    raise _Refused(f"its output is longer than {MAX_CHARS} characters")
                pieces.append(piece)
    except _Refused as err:
        raise TokenizerError(f"{source}: the chat template was stopped: {err}") from None
    except jinja2.exceptions.SecurityError as err:
        raise TokenizerError(f"{source}: the chat template tried an unsafe operation "
                             f"and was stopped by the sandbox: {err}") from None
    except jinja2.exceptions.TemplateError as err:  # raise_exception(...) and undefined names land here
        raise TokenizerError(f"{source}: the chat template failed: {err}") from None
    except RecursionError:
        raise TokenizerError(f"{source}: the chat template failed: it recursed too deeply") from None
    except Exception as err:  # noqa: BLE001 -- ZeroDivisionError, OverflowError, TypeError, MemoryError, ...
        raise TokenizerError(f"{source}: the chat template failed ({type(err).__name__}: {err})") from None
    return "".join(pieces)


class _step_budget:
    """Count the lines compiled template code executes (its code objects are named "<template>")
    and stop the render past `steps`: a loop that builds nothing cannot run forever."""

    def __init__(self, steps: int):
        self.left = steps

    def _line(self, frame, event, arg):
        if event == "line":
            self.left -= 1
            if self.left < 0:
                raise _Refused(f"it ran more than {MAX_STEPS} template steps")
        return self._line

    def _call(self, frame, event, arg):
        return self._line if frame.f_code.co_filename == "<template>" else None

    def __enter__(self):
        self.previous = sys.gettrace()
        sys.settrace(self._call)

    def __exit__(self, *exc):
        sys.settrace(self.previous)
        return False
