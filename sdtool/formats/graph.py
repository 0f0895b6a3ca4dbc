"""From an unpickled object graph to named tensors plus the non-tensor rest.

The rules, in one place:
- the state dict is the root, unwrapped through ``state_dict`` keys (nested too), or the sub-dict
  a dotted ``key`` names;
- every tensor inside it gets a dotted name (dict keys, list indexes, stand-ins' args and state;
  a pickled nn.Module's ``_parameters``/``_buffers``/``_modules`` flatten the way torch's
  ``state_dict()`` names them);
- ``extra`` is the whole root with those tensors taken out (containers they leave empty go too);
  tensors outside the state dict (optimizer state) stay in ``extra`` as TensorInfo leaves.
"""

from __future__ import annotations

from typing import Any

from sdtool.errors import CorruptFile, UsageError
from sdtool.formats.unpickler import NumpyArray, StandInType
from sdtool.model import StandIn, TensorInfo

MAX_DEPTH = 200  # three Python frames a level: well inside the interpreter's recursion limit
_MODULE_GROUPS = ("_parameters", "_buffers", "_modules")
_DROP = object()


def normalize(obj: Any) -> Any:
    """Replace loader-internal objects by what users see (stand-in types, numpy arrays)."""
    if isinstance(obj, StandInType):
        return StandIn(obj.st_module, obj.st_name)
    if isinstance(obj, NumpyArray):
        return obj.value()
    return obj


def select(root: Any, key: str | None) -> tuple[Any, list[str]]:
    """The object holding the model's tensors and its path from the root."""
    cur = normalize(root)
    path: list[str] = []
    if key:
        for part in key.split("."):
            cur = _child(cur, part)
            if cur is _DROP:
                raise UsageError(f"key={key!r}: {'.'.join([*path, part])!r} is not in the file")
            path.append(part)
        if not isinstance(cur, dict | list | tuple | StandIn):  # nothing can hold tensors there
            raise UsageError(
                f"key={key!r} names {_kind(cur)}, not a dict of tensors"
                + (f" (it is {cur!r})" if isinstance(cur, int | float | bool) else "")
            )
        return cur, path
    while isinstance(cur, dict) and isinstance(cur.get("state_dict"), dict):
        cur = cur["state_dict"]
        path.append("state_dict")
    return cur, path


def _child(obj: Any, part: str) -> Any:
    obj = normalize(obj)
    if isinstance(obj, dict):
        for k, v in obj.items():
            if _name(k) == part:
                return normalize(v)
    if isinstance(obj, list | tuple) and part.isdigit() and int(part) < len(obj):
        return normalize(obj[int(part)])
    if isinstance(obj, StandIn) and isinstance(obj.state, dict):
        return _child(obj.state, part)
    return _DROP


def _kind(obj: Any) -> str:
    """'an int', 'a str', 'a tensor' ... for an error message."""
    name = "tensor" if isinstance(obj, TensorInfo) else type(obj).__name__
    return f"{'an' if name[:1] in 'aeiou' else 'a'} {name}"


def _name(k: Any) -> str:
    if isinstance(k, bytes):
        return k.decode("latin1")
    if isinstance(k, StandIn):
        return k.qualname
    return str(k)


class _Walker:
    def __init__(self, main: Any) -> None:
        self.main = main
        self.tensors: dict[str, TensorInfo] = {}
        self.seen: dict[int, Any] = {}

    def add(self, name: str, t: TensorInfo) -> None:
        base, n = name or "tensor", 1
        name = base
        while name in self.tensors:
            n += 1
            name = f"{base}#{n}"
        self.tensors[name] = t

    def walk(self, obj: Any, name: str, in_main: bool, depth: int) -> Any:
        """Collect tensors under ``name`` (when in the state dict); return obj without them."""
        if depth > MAX_DEPTH:
            raise CorruptFile(f"the object graph nests deeper than {MAX_DEPTH} levels")
        obj = normalize(obj)
        if obj is self.main:  # names inside the state dict start afresh
            in_main, name = True, ""
        if isinstance(obj, TensorInfo):
            if in_main:
                self.add(name, obj)
                return _DROP
            return obj
        if not isinstance(obj, dict | list | tuple | StandIn):
            return obj
        if id(obj) in self.seen:  # shared or cyclic containers are walked once
            return self.seen[id(obj)]
        self.seen[id(obj)] = obj
        out = self._walk_container(obj, name, in_main, depth)
        self.seen[id(obj)] = out
        return out

    def _walk_container(self, obj: Any, name: str, in_main: bool, depth: int) -> Any:
        def sub(k: Any) -> str:
            return f"{name}.{_name(k)}" if name else _name(k)

        if isinstance(obj, dict):
            res = {}
            for k, v in obj.items():
                w = self.walk(v, sub(k), in_main, depth + 1)
                if w is not _DROP:
                    res[normalize(k)] = w
            return _DROP if obj and not res else res  # emptied by taking tensors out
        if isinstance(obj, list | tuple):
            items = [self.walk(v, sub(i), in_main, depth + 1) for i, v in enumerate(obj)]
            kept = [w for w in items if w is not _DROP]
            if obj and not kept:
                return _DROP
            return type(obj)(kept) if isinstance(obj, list) else tuple(kept)
        return self._walk_standin(obj, name, in_main, depth)

    def _walk_standin(self, obj: StandIn, name: str, in_main: bool, depth: int) -> Any:
        state = normalize(obj.state)
        if isinstance(state, dict) and any(g in state for g in _MODULE_GROUPS):
            # a pickled nn.Module: name tensors as torch's state_dict() does
            new_state: dict[Any, Any] = {}
            for k, v in state.items():
                if k in _MODULE_GROUPS and isinstance(normalize(v), dict):
                    w = self.walk(v, name, in_main, depth + 1)
                else:
                    w = self.walk(v, f"{name}.{k}" if name else str(k), in_main, depth + 1)
                if w is not _DROP:
                    new_state[k] = w
            new_args = obj.args
            state_out: Any = new_state
        else:
            args = self.walk(obj.args, name, in_main, depth + 1) if obj.args else obj.args
            new_args = () if args is _DROP else args
            w = self.walk(state, name, in_main, depth + 1) if state is not None else None
            state_out = None if w is _DROP else w
        items = self.walk(dict(obj.items), name, in_main, depth + 1) if obj.items else {}
        listitems = self.walk(obj.listitems, name, in_main, depth + 1) if obj.listitems else []
        return StandIn(
            obj.module,
            obj.name,
            new_args,
            obj.kwargs,
            state_out,
            [] if items is _DROP else list(items.items()),
            [] if listitems is _DROP else listitems,
        )


def collect(root: Any, key: str | None = None) -> tuple[dict[str, TensorInfo], dict[str, Any], str]:
    """(state-dict tensors by dotted name, the non-tensor rest, the state dict's path)."""
    main, path = select(root, key)
    w = _Walker(main)
    try:
        rest = w.walk(root, "", main is normalize(root), 0)
        if main is not normalize(root) and not w.tensors:
            # the key/state_dict object was reached only through a path the walk skipped
            w.walk(main, "", True, 0)
    except RecursionError:  # a caller already deep in the stack: the same answer, not a crash
        raise CorruptFile(f"the object graph nests deeper than {MAX_DEPTH} levels") from None
    if rest is _DROP:
        extra: dict[str, Any] = {}
    elif isinstance(rest, dict):
        extra = {_name(k): v for k, v in rest.items()}
    else:
        extra = {"object": rest}
    return w.tensors, extra, ".".join(path)
