"""The feature-set metadata: small frozen dataclasses, written as JSON into the root group.

Why: a store must describe itself completely (model, revision, template, token ids before the
image, which layers/heads/kinds, key RoPE convention, encoding), so anyone can recompute any
stored vector, and old code must refuse a newer layout clearly instead of misreading it.
Every field is typed and bounded, and checked when a store is opened (``check_meta``): a
damaged or hand-edited zarr.json is a one-line StoreError naming the field, never a crash
or a gigabyte allocation further on. The nested sections (``ModelSource``, ``DatasetInfo``,
``Encoding``, ``PrefixChoice``) keep the keys they were read with, in their order, so a
store's metadata is written back byte for byte and its fingerprint never changes.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator

from kvpipe.errors import StoreError

SCHEMA_VERSION = 1


class Kind(str, enum.Enum):
    """What a store array holds; equal to (and serialised as) its plain string."""

    KEYS = "keys"
    VALUES = "values"
    HIDDEN = "hidden"  # a vision encoder's block outputs: one "head" as wide as the encoder
    POST_PROJ = "post_proj"  # visual features after the projector, as fed to the LM

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return self.value.__format__(spec)


HIDDEN = Kind.HIDDEN.value
KINDS = (Kind.KEYS.value, Kind.VALUES.value, HIDDEN)  # per (layer, kv_head) token features [layer, head, token, dim]
POST_PROJ = Kind.POST_PROJ.value
ALL_KINDS = (*KINDS, POST_PROJ)
KEY_ROPE = ("post-rope", "pre-rope")
KEY_CONVENTIONS = (*KEY_ROPE, "none")  # "none": a vision encoder's store (no keys)
STORE_DTYPES = ("float32", "float16", "bfloat16", "int8", "int4", "pca")  # int8, int4, pca: lossy (store.encoding)
COMPUTE_DTYPES = ("float32", "float16", "bfloat16")
META_ATTR = "kvpipe"

# Bounds of the metadata fields: far above any real model or dataset, far below what would make
# `kvpipe status` or a reader allocate gigabytes. Part names have six digits (p000000).
MAX_PARTS = 1_000_000
MAX_IMAGES = 100_000_000
MAX_PART_SIZE = 1 << 20
MAX_LAYERS = 10_000
MAX_HEADS = 4096
MAX_DIM = 1 << 20
MAX_TOKEN_ID = 1 << 31
MAX_PREFIX_TOKENS = 1 << 20


def _fail(where: str, name: str, problem: str) -> StoreError:
    return StoreError(f"{where}: metadata field {name} {problem}; the store is damaged "
                      f"(run kvpipe verify, or re-extract it)")


def _show(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_int(where: str, name: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(where, name, f"must be an integer, not {_show(value)}")
    if not lo <= value <= hi:
        raise _fail(where, name, f"is {value}, outside {lo}..{hi}")
    return value


def check_str(where: str, name: str, value: Any, allowed: tuple[str, ...] | None = None,
              optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise _fail(where, name, f"must be a string, not {_show(value)}")
    if allowed is not None and value not in allowed:
        raise _fail(where, name, f"is {value!r}, not one of {', '.join(allowed)}")
    return value


def check_int_list(where: str, name: str, value: Any, lo: int, hi: int, max_len: int,
                   ascending: bool = False) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)):
        raise _fail(where, name, f"must be a list of integers, not {_show(value)}")
    if len(value) > max_len:
        raise _fail(where, name, f"has {len(value)} entries, more than {max_len}")
    out = tuple(check_int(where, f"{name}[{i}]", v, lo, hi) for i, v in enumerate(value))
    if ascending and any(a >= b for a, b in zip(out, out[1:])):
        raise _fail(where, name, f"must be strictly ascending, not {_show(list(out))}")
    return out


def check_str_list(where: str, name: str, value: Any, allowed: tuple[str, ...] | None = None) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)):
        raise _fail(where, name, f"must be a list of strings, not {_show(value)}")
    return tuple(check_str(where, f"{name}[{i}]", v, allowed) for i, v in enumerate(value))


@dataclass(frozen=True, kw_only=True, eq=False)
class Section:
    """A nested metadata object: typed fields plus any other keys it was written with.

    ``keys`` remembers the keys (and their order) of the dict it came from, so ``to_dict``
    writes back exactly that dict; a section built in code writes its non-None fields."""

    extra: dict[str, Any] = field(default_factory=dict, compare=True)
    keys: tuple[str, ...] = field(default=(), compare=False, repr=False)

    _SPECS: ClassVar[dict[str, tuple]] = {}  # field -> (type check, argument...)

    @classmethod
    def _typed(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.name not in ("extra", "keys")]

    @classmethod
    def from_dict(cls, data: Any, where: str = "store", name: str = "") -> "Section":
        name = name or cls.__name__
        if isinstance(data, Section):
            return data
        if not isinstance(data, dict):
            raise _fail(where, name, f"must be a JSON object, not {_show(data)}")
        typed = cls._typed()
        kw = {k: cls._check(where, f"{name}.{k}", k, data[k]) for k in typed if k in data}
        extra = {k: v for k, v in data.items() if k not in typed}
        return cls(**kw, extra=extra, keys=tuple(data))

    @classmethod
    def _check(cls, where: str, name: str, key: str, value: Any) -> Any:
        kind, *args = cls._SPECS.get(key, ("any",))
        if value is None:
            return None  # every typed field is optional (older stores lack some)
        if kind == "str":
            return check_str(where, name, value, *args)
        if kind == "int":
            return check_int(where, name, value, *args)
        if kind == "strs":
            return check_str_list(where, name, value)
        if kind == "float":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not args[0] <= value <= args[1]:
                raise _fail(where, name, f"must be a number in [{args[0]}, {args[1]}], not {_show(value)}")
            return float(value)
        if kind == "newer":  # a name a later kvpipe may add: refused as unknown, not as damage
            check_str(where, name, value)
            if value not in args[0]:
                raise StoreError(f"{where} uses {name} {value!r}, which this kvpipe does not know "
                                 f"(known: {', '.join(args[0])}); upgrade kvpipe to read it")
        return value

    def _value(self, key: str) -> Any:
        if key in self.extra:
            return self.extra[key]
        value = getattr(self, key)
        return list(value) if isinstance(value, tuple) else value

    def to_dict(self) -> dict[str, Any]:
        if self.keys:
            keys = list(self.keys)
        else:
            keys = [k for k in self._typed() if getattr(self, k) is not None]
        keys += [k for k in self.extra if k not in keys]
        return json.loads(json.dumps({k: self._value(k) for k in keys}))

    # Read-only mapping view (``section.get("name")``), for code written against the plain dicts.
    def get(self, key: str, default: Any = None) -> Any:
        d = self.to_dict()
        return d.get(key, default)

    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def __contains__(self, key: str) -> bool:
        return key in self.to_dict()

    def items(self) -> Iterator[tuple[str, Any]]:
        return iter(self.to_dict().items())

    def __bool__(self) -> bool:
        return bool(self.to_dict())

    def __eq__(self, other: object) -> bool:
        """Equal to a section of the same type or a dict with the same content (key order aside)."""
        if isinstance(other, dict):
            return self.to_dict() == other
        return type(other) is type(self) and self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]  (like the dicts it replaces)


@dataclass(frozen=True, kw_only=True, eq=False)
class ModelSource(Section):
    """Where the model came from: registry name or hub id / path, checkpoint, revision, commit
    hash, "pretrained" or "random" weights (with the seed), adapter family; encoders add
    ``features`` (what was stored), kept in ``extra``."""

    name: str | None = None
    checkpoint: str | None = None
    revision: str | None = None
    init: str | None = None
    seed: int | None = None
    family: str | None = None
    commit: str | None = None

    _SPECS: ClassVar[dict[str, tuple]] = {
        "name": ("str",), "checkpoint": ("str",), "revision": ("str",), "init": ("str",),
        "seed": ("int", -(1 << 63), (1 << 64) - 1), "family": ("str",), "commit": ("str",)}


@dataclass(frozen=True, kw_only=True, eq=False)
class DatasetInfo(Section):
    """The dataset adapter's ``describe()`` (name, root, split, limit, its own options in
    ``extra``), the probes its annotations support and the fingerprint of dataset.json."""

    name: str | None = None
    root: str | None = None
    split: str | None = None
    limit: int | None = None
    tasks: tuple[str, ...] | None = None
    structure_sha256: str | None = None

    _SPECS: ClassVar[dict[str, tuple]] = {
        "name": ("str",), "root": ("str",), "split": ("str",), "limit": ("int", 0, MAX_IMAGES * 100),
        "tasks": ("strs",), "structure_sha256": ("str",)}


BLOSC_CNAMES = ("zstd", "lz4", "lz4hc", "blosclz", "zlib")
SHUFFLES = ("byte", "bit", "none")


@dataclass(frozen=True, kw_only=True, eq=False)
class Encoding(Section):
    """The chunk codec (``store.encoding.CODECS``); empty in stores made before the choice
    existed, which were written with Blosc zstd level 3, byte shuffle. A lossy store dtype
    adds its parameters: ``quant`` (int8 | int4 | pca), ``scale`` (absmax: symmetric; minmax: a
    scale and a zero point per token; step: pca's one step per chunk), ``rotation`` (hadamard |
    none) and ``rotation_seed`` (int4), ``step`` (pca's step in units of the chunk's RMS).
    A value this kvpipe does not know (a newer store) is refused with "upgrade kvpipe"."""

    codec: str | None = None
    cname: str | None = None
    clevel: int | None = None
    shuffle: str | None = None
    quant: str | None = None
    scale: str | None = None
    rotation: str | None = None
    rotation_seed: int | None = None
    step: float | None = None

    _SPECS: ClassVar[dict[str, tuple]] = {
        "codec": ("str", ("blosc",)), "cname": ("str", BLOSC_CNAMES), "clevel": ("int", 0, 9),
        "shuffle": ("str", SHUFFLES), "quant": ("newer", ("int8", "int4", "pca")),
        "scale": ("newer", ("absmax", "minmax", "step")),
        "rotation": ("newer", ("hadamard", "none")), "rotation_seed": ("int", 0, (1 << 32) - 1),
        "step": ("float", 1e-6, 1e3)}


@dataclass(frozen=True, kw_only=True, eq=False)
class PrefixChoice(Section):
    """Per-image prefixes (``--prefix-from`` / ``--prefix-control``); empty when none. Each
    image's text is its manifest row's meta["prefix"]."""

    source: str | None = None
    control: str | None = None
    seed: int | None = None

    _SPECS: ClassVar[dict[str, tuple]] = {
        "source": ("str",), "control": ("str",), "seed": ("int", -(1 << 63), (1 << 64) - 1)}


VIEWS = ("all", "base")


@dataclass(frozen=True, kw_only=True, eq=False)
class ViewChoice(Section):
    """Which views of an any-resolution model's image were stored (``kvpipe extract --views``):
    ``all`` (every token: base view, crops or tiles, newlines) or ``base`` (the base view's grid
    only: what the probes read by default; crops are not written). ``reason`` says how it was
    chosen (the option, or the tasks it serves). Empty in stores made before the choice
    existed, which hold every view."""

    views: str | None = None
    reason: str | None = None

    _SPECS: ClassVar[dict[str, tuple]] = {"views": ("newer", VIEWS), "reason": ("str",)}


_SECTIONS = {"model": ModelSource, "dataset": DatasetInfo, "compressor": Encoding, "prefix_choice": PrefixChoice,
             "views": ViewChoice}


@dataclass(frozen=True)
class FeatureSetMeta:
    """Everything that defines one extraction (model, dataset, options) and how it is encoded."""

    model: ModelSource  # name, checkpoint, revision, commit, init, seed, family
    dataset: DatasetInfo  # the adapter's describe(), tasks, structure_sha256
    layers: tuple[int, ...]  # model layer indices stored, ascending
    heads: tuple[int, ...]  # KV head indices stored, ascending
    kinds: tuple[str, ...]  # subset of ALL_KINDS
    keys_rope: str  # "post-rope" (as cached, what text queries see) or "pre-rope" (k_proj output);
    #                 "none" for a vision encoder's store (no keys)
    n_layers: int  # of the model
    n_kv_heads: int
    head_dim: int
    hidden_size: int
    compute_dtype: str
    store_dtype: str
    template: str  # "chat" or "none"
    prefix: str  # the text before every image ("" when none, or when each image has its own)
    prefix_token_ids: tuple[int, ...]  # every token id before the first image token; with per-image
    #                                    prefixes (prefix_choice), the template's alone (prefix "")
    image_token_id: int
    part_size: int
    n_images: int
    image_ids_sha256: str  # fingerprint of the dataset's ordered image ids
    text_queries: tuple[str, ...] = ()
    compressor: Encoding = field(default_factory=Encoding)
    # per-image prefixes (kvpipe extract --prefix-from / --prefix-control): {"source", "control",
    # "seed"}; each image's text is its manifest row's meta["prefix"]. {}: none (older stores too)
    prefix_choice: PrefixChoice = field(default_factory=PrefixChoice)
    # which views were stored ({"views": "all" | "base", "reason": ...}); {}: every view (older stores)
    views: ViewChoice = field(default_factory=ViewChoice)
    # how the text queries' features are stored: "" = as the images' (store_dtype; older stores,
    # lossless stores); a lossy store keeps its few text queries lossless (the compute dtype), so
    # a text-grounded probe's error is the images' alone (int4 text had doubled semantic-seg's)
    text_dtype: str = ""
    command: str = ""
    kvpipe_version: str = ""
    schema_version: int = SCHEMA_VERSION

    # Fields that may differ between two runs writing the same feature set.
    _PROVENANCE = ("command", "kvpipe_version")

    def __post_init__(self) -> None:
        # plain dicts (code and tests that build metadata by hand) become the typed sections
        for name, cls in _SECTIONS.items():
            value = getattr(self, name)
            if not isinstance(value, Section):
                object.__setattr__(self, name, cls.from_dict(value or {}, "metadata", name))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in ("views", "text_dtype") and not value:
                continue  # older stores have neither; their metadata is written back as it was
            out[f.name] = value.to_dict() if isinstance(value, Section) else value
        return json.loads(json.dumps(out))

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "store") -> "FeatureSetMeta":
        if not isinstance(data, dict):
            raise StoreError(f"{where}: its kvpipe metadata is not a JSON object; it is not a kvpipe feature store")
        version = data.get("schema_version")
        if isinstance(version, bool) or not isinstance(version, int):
            raise StoreError(f"{where} has no kvpipe schema version; it is not a kvpipe feature store")
        if version > SCHEMA_VERSION:
            raise StoreError(f"{where} uses store schema {version}, newer than this kvpipe "
                             f"({SCHEMA_VERSION}); upgrade kvpipe to read it")
        names = {f.name for f in dataclasses.fields(cls)}
        missing = names - set(data) - {"text_queries", "compressor", "prefix_choice", "views", "text_dtype",
                                       "command", "kvpipe_version"}
        if missing:
            raise StoreError(f"{where} metadata lacks {', '.join(sorted(missing))}; the store is damaged")
        kw = {k: v for k, v in data.items() if k in names}
        for name, section in _SECTIONS.items():
            if name in kw:
                kw[name] = section.from_dict(kw[name], where, name)
        check_fields(kw, where)
        for k in ("layers", "heads", "kinds", "prefix_token_ids", "text_queries"):
            if k in kw:
                kw[k] = tuple(kw[k])
        return cls(**kw)

    def validate(self, where: str = "store") -> None:
        """The bounds ``from_dict`` checks, for metadata built in code."""
        check_fields({f.name: getattr(self, f.name) for f in dataclasses.fields(self)}, where)

    def identity(self) -> dict[str, Any]:
        """What must match for a rerun to resume into this store."""
        d = self.to_dict()
        for k in self._PROVENANCE:
            d.pop(k, None)
        if not d.get("prefix_choice"):
            d.pop("prefix_choice", None)  # stores without per-image prefixes keep their fingerprint
        if self.stored_views == "all":
            d.pop("views", None)  # every view stored: the same feature set as an older store's
        else:
            d["views"] = {"views": self.stored_views}  # how it was chosen is provenance
        return d

    @property
    def text_store_dtype(self) -> str:
        """The encoding of the text queries' features."""
        return self.text_dtype or self.store_dtype

    @property
    def stored_views(self) -> str:
        """"base" when only the base view's tokens were stored, else "all" (older stores too)."""
        return self.views.views or "all"

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:16]

    @property
    def n_parts(self) -> int:
        return -(-self.n_images // self.part_size)

    def layer_index(self, layer: int) -> int:
        try:
            return self.layers.index(layer)
        except ValueError:
            raise StoreError(f"layer {layer} is not in this store (stored: {list(self.layers)})") from None

    def head_index(self, head: int) -> int:
        try:
            return self.heads.index(head)
        except ValueError:
            raise StoreError(f"KV head {head} is not in this store (stored: {list(self.heads)})") from None


def check_fields(kw: dict[str, Any], where: str) -> None:
    """Type and bound of every top-level metadata field (one-line StoreError naming it)."""
    n_layers = check_int(where, "n_layers", kw["n_layers"], 1, MAX_LAYERS)
    n_heads = check_int(where, "n_kv_heads", kw["n_kv_heads"], 1, MAX_HEADS)
    check_int_list(where, "layers", kw["layers"], 0, n_layers - 1, MAX_LAYERS, ascending=True)
    check_int_list(where, "heads", kw["heads"], 0, n_heads - 1, MAX_HEADS, ascending=True)
    kinds = check_str_list(where, "kinds", kw["kinds"], ALL_KINDS)
    if not kinds or len(set(kinds)) != len(kinds):
        raise _fail(where, "kinds", f"must list distinct kinds, not {_show(list(kinds))}")
    check_str(where, "keys_rope", kw["keys_rope"], KEY_CONVENTIONS)
    check_int(where, "head_dim", kw["head_dim"], 1, MAX_DIM)
    check_int(where, "hidden_size", kw["hidden_size"], 1, MAX_DIM)
    check_str(where, "compute_dtype", kw["compute_dtype"], COMPUTE_DTYPES)
    for name in ("store_dtype", "text_dtype"):
        value = check_str(where, name, kw.get(name, ""))
        if (value or name == "store_dtype") and value not in STORE_DTYPES:
            raise StoreError(f"{where} uses encoding {value!r} ({name}), which this kvpipe does not "
                             f"know (known: {', '.join(STORE_DTYPES)}); upgrade kvpipe to read it")
    check_str(where, "template", kw["template"])
    check_str(where, "prefix", kw["prefix"])
    check_int_list(where, "prefix_token_ids", kw["prefix_token_ids"], 0, MAX_TOKEN_ID, MAX_PREFIX_TOKENS)
    check_int(where, "image_token_id", kw["image_token_id"], -1, MAX_TOKEN_ID)
    part_size = check_int(where, "part_size", kw["part_size"], 1, MAX_PART_SIZE)
    n_images = check_int(where, "n_images", kw["n_images"], 0, MAX_IMAGES)
    if -(-n_images // part_size) > MAX_PARTS:
        raise _fail(where, "n_images", f"is {n_images}: {-(-n_images // part_size)} parts of {part_size}, "
                                       f"more than {MAX_PARTS}")
    check_str(where, "image_ids_sha256", kw["image_ids_sha256"])
    check_str_list(where, "text_queries", kw.get("text_queries", ()))
    check_str(where, "command", kw.get("command", ""))
    check_str(where, "kvpipe_version", kw.get("kvpipe_version", ""))
    check_int(where, "schema_version", kw.get("schema_version", SCHEMA_VERSION), 1, SCHEMA_VERSION)


def ids_fingerprint(image_ids: list[str]) -> str:
    """sha256 of the ordered image ids; ids from file names that are not UTF-8 carry
    surrogate escapes (os.fsdecode), which are hashed as the file name's own bytes."""
    return hashlib.sha256("\n".join(image_ids).encode("utf-8", errors="surrogateescape")).hexdigest()


def structure_fingerprint(structure: dict[str, Any]) -> str:
    """Hash of the dataset-level annotations, so a changed pair list is another feature set."""
    return hashlib.sha256(json.dumps(structure, sort_keys=True).encode()).hexdigest()
