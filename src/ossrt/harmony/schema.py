"""JSON schema → the TypeScript-like types of Harmony's tools section (spec §7.5), exactly as openai-harmony
writes them, including how its serde_json reads and prints numbers (`json_text`): openai-harmony's Rust code is
the reference, so its quirks are reproduced here on purpose (the differential tests check them)."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

_MISSING = object()


def _get(v: Any, key: str) -> Any:
    """`serde_json::Value::get`: the member, `_MISSING` if absent or `v` is not an object."""
    return v.get(key, _MISSING) if isinstance(v, Mapping) else _MISSING


def _str(v: Any, key: str) -> str | None:
    x = _get(v, key)
    return x if isinstance(x, str) else None


def _is_enum(v: Any) -> bool:
    e = _get(v, "enum")
    return isinstance(e, list) and len(e) > 0


def _nullable(v: Any) -> bool:
    return _get(v, "nullable") is True


def schema_to_typescript(schema: Any, indent: str = "") -> str:
    """A JSON schema as Harmony's TypeScript-like type (spec §7.5), exactly as openai-harmony renders it."""
    one_of = _get(schema, "oneOf")
    if isinstance(one_of, list):
        out = ""
        for variant in one_of:
            out += f"\n{indent} | " + _variant_type(variant, indent)
            trailing = [d] if (d := _str(variant, "description")) is not None else []
            default = _get(variant, "default")
            if default is not _MISSING:
                quoted = isinstance(default, str) and not _is_enum(variant)
                trailing.append(f'default: "{default}"' if quoted else f"default: {json_text(default)}")
            if trailing:
                out += " // " + " ".join(trailing)
        return out
    ty = _get(schema, "type")
    if isinstance(ty, list):
        names = ["number" if t == "integer" else t for t in ty if isinstance(t, str)]
        if names:
            return " | ".join(names)
    if not isinstance(ty, str):
        return "any"
    if ty == "object":
        return _object_type(schema, indent)
    if ty == "string":
        enum = _get(schema, "enum")
        values = [f'"{v}"' for v in enum if isinstance(v, str)] if isinstance(enum, list) else []
        return " | ".join(values) if values else "string"
    if ty in ("number", "integer"):
        return "number"
    if ty == "boolean":
        return "boolean"
    if ty == "array":
        items = _get(schema, "items")
        return "Array<any>" if items is _MISSING else schema_to_typescript(items, indent) + "[]"
    return "any"


def _variant_type(variant: Any, indent: str) -> str:
    t = schema_to_typescript(variant, indent + "   ")
    return t + " | null" if _nullable(variant) and "null" not in t else t


def _default_text(default: Any, schema: Any) -> str:
    """A property default as a comment shows it: strings unquoted on enums, quoted (raw) otherwise, JSON else."""
    if isinstance(default, str):
        return default if _is_enum(schema) else f'"{default}"'
    return json_text(default)


def _object_type(schema: Any, indent: str) -> str:
    out = f"{indent}// {d}\n" if (d := _str(schema, "description")) is not None else ""
    out += "{\n"
    props = _get(schema, "properties")
    if isinstance(props, Mapping):
        req = _get(schema, "required")
        required = {r for r in req if isinstance(r, str)} if isinstance(req, list) else set()
        for key, val in props.items():
            opt = "" if key in required else "?"
            if (title := _str(val, "title")) is not None:
                out += f"{indent}// {title}\n{indent}//\n"
            one_of = _get(val, "oneOf")
            if one_of is _MISSING and (d := _str(val, "description")) is not None:
                out += f"{indent}// {d}\n"
            examples = _get(val, "examples")
            if isinstance(examples, list) and examples:
                out += f"{indent}// Examples:\n"
                out += "".join(f'{indent}// - "{ex}"\n' for ex in examples if isinstance(ex, str))
            if isinstance(one_of, list):
                out += _one_of_property(key, opt, val, one_of, indent)
                continue
            t = schema_to_typescript(val, indent + "    ")
            if _nullable(val) and "null" not in t:
                t += " | null"
            out += f"{indent}{key}{opt}: {t},"
            default = _get(val, "default")
            if one_of is _MISSING and default is not _MISSING:
                out += f" // default: {_default_text(default, val)}"
            out += "\n"
    return out + f"{indent}}}"


def _one_of_property(key: str, opt: str, val: Any, variants: list, indent: str) -> str:
    out = ""
    desc = _str(val, "description")
    # The property description is written above unless the first variant repeats it.
    above = desc is not None and not (variants and _str(variants[0], "description") == desc)
    if above:
        out += f"{indent}// {desc}\n"
    default = _get(val, "default")
    if default is not _MISSING:
        out += f"{indent}// default: {_default_text(default, val)}\n"
    out += f"{indent}{key}{opt}:\n"
    for k, variant in enumerate(variants):
        out += f"{indent} | " + _variant_type(variant, indent)
        trailing = []
        vdesc = _str(variant, "description")
        if not (k == 0 and above) and vdesc is not None and vdesc != desc:
            trailing.append(vdesc)
        vdefault = _get(variant, "default")
        if vdefault is not _MISSING:
            trailing.append(f"default: {_default_text(vdefault, variant)}")
        if trailing:
            out += " // " + " ".join(trailing)
        out += "\n"
    return out + f"{indent},\n"


def json_text(v: Any) -> str:
    """Compact JSON as openai-harmony prints a default: Python's JSON text read by serde_json, shown by its
    `Display` (non-ASCII kept, numbers as serde_json holds and formats them)."""
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, int):
        return str(v) if -2**63 <= v < 2**64 else _rust_float(_serde_f64(str(v)))
    if isinstance(v, float):
        return _rust_float(_serde_f64(repr(v))) if math.isfinite(v) else "null"
    if isinstance(v, Mapping):
        return "{" + ",".join(json.dumps(str(k), ensure_ascii=False) + ":" + json_text(x) for k, x in v.items()) + "}"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(json_text(x) for x in v) + "]"
    return json.dumps(v, ensure_ascii=False)


_POW10 = [float(f"1e{k}") for k in range(309)]  # correctly rounded literals, like serde_json's table
_NUMBER = re.compile(r"(-?)(\d+)(?:\.(\d+))?(?:[eE]([+-]?\d+))?")


def _serde_f64(text: str) -> float:
    """serde_json's default (not round-trip exact) parse of a JSON number to f64: the digits that fit in a u64
    as the significand, then one multiplication or division by an exact power of ten. It can be 1 ULP off the
    correctly rounded value for long mantissas, and openai-harmony prints what it gets."""
    sign, whole, frac, exp = _NUMBER.fullmatch(text).groups()
    significand, exponent = 0, int(exp or 0)
    digits = whole + (frac or "")
    for k, d in enumerate(digits):
        if significand * 10 + int(d) > 2**64 - 1:
            # Digits that do not fit are dropped; only those before the decimal point still count as powers of 10.
            exponent += max(len(whole) - k, 0)
            break
        significand = significand * 10 + int(d)
        if k >= len(whole):
            exponent -= 1
    f = float(significand)
    while True:
        if abs(exponent) <= 308:
            f = f * _POW10[exponent] if exponent >= 0 else f / _POW10[-exponent]
            break
        if f == 0.0 or exponent > 0:
            break
        f /= 1e308
        exponent += 308
    return -f if sign else f


def _rust_float(f: float) -> str:
    """`ryu`'s formatting of an f64, which serde_json uses: shortest round-trip digits, plain notation while the
    decimal exponent fits (up to 16 integer digits, down to 0.0000d), else `d.ddde-x` / `de+x` without a "+"."""
    if not math.isfinite(f):
        return "null"
    sign = "-" if math.copysign(1.0, f) < 0 else ""
    if f == 0:
        return sign + "0.0"
    _, digits, e = Decimal(repr(abs(f))).normalize().as_tuple()  # shortest digits, as ryu finds them
    ds, n = "".join(map(str, digits)), len(digits)
    kk = n + e  # 10^(kk-1) <= |f| < 10^kk
    if e >= 0 and kk <= 16:
        return f"{sign}{ds}{'0' * e}.0"
    if 0 < kk <= 16:
        return f"{sign}{ds[:kk]}.{ds[kk:]}"
    if -5 < kk <= 0:
        return f"{sign}0.{'0' * -kk}{ds}"
    return f"{sign}{ds if n == 1 else ds[0] + '.' + ds[1:]}e{kk - 1}"

