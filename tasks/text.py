"""Text classification tasks: SST-2 and any Hugging Face / local text data set.

Inputs are token ids; the attack space is each model's *own* input-embedding space, so
``logits(model, batch, delta)`` runs ``model(inputs_embeds=embeddings(ids) + delta)`` and the
student, the EMA teacher and frozen teachers each apply the same ``delta`` to their own
embeddings. Padding and special tokens ([CLS], [SEP], ...) never move: the perturbation mask
is the attention mask minus the special tokens.

Data come from a local directory of parquet / CSV / JSON(L) files named by split
(``train-00000-of-00001.parquet``, ``validation.csv``, ...) or, when online, a hub name.
Texts are tokenised once, truncated to ``max_length`` tokens (the number truncated is
reported); batches are padded dynamically to their longest text.
"""
from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from robustkd.registry import register_task
from robustkd.task import Batch, DataNotFoundError, Task, check_norm, pick_column
from robustkd.threat import ThreatModel

SPLIT_ALIASES = {"test": ("validation", "test", "valid", "val", "dev"), "train": ("train",)}
TEXT_COLUMNS = ("sentence", "text", "review", "content", "document")
LABEL_COLUMNS = ("label", "labels")
DATA_SUFFIXES = {".parquet": "parquet", ".csv": "csv", ".json": "json", ".jsonl": "json"}


def unwrap(model: nn.Module) -> nn.Module:
    from robustkd.teachers import unwrap as _unwrap

    return _unwrap(model)


def input_embeddings(model: nn.Module) -> nn.Embedding:
    """``model``'s input (word) embedding table, from the transformers ``get_input_embeddings()`` every
    sequence classifier has."""
    get = cast(Callable[[], nn.Embedding], unwrap(model).get_input_embeddings)
    return get()


# -- raw data -------------------------------------------------------------------------------
def _data_files(root: Path) -> dict[str, list[Path]]:
    """Group the data files under ``root`` (or ``root/data``) by the split their names start with."""
    for folder in (root, root / "data"):
        files = sorted(p for p in folder.glob("*") if p.suffix in DATA_SUFFIXES)
        if files:
            groups: dict[str, list[Path]] = {}
            for f in files:
                split = f.name.split(".")[0].split("-")[0]
                groups.setdefault(split, []).append(f)
            return groups
    return {}


@functools.lru_cache(maxsize=16)
def load_raw_split(data_dir: str | None, hub_name: str | None, hub_config: str | None, split: str,
                   trust_remote_code: bool = False, encoding: str | None = None) -> Any:
    """One split as a ``datasets.Dataset`` (cached per process). Raises :class:`DataNotFoundError`
    with the fix when the data cannot be found."""
    import datasets

    from robustkd.guards import check_parquet_files, check_split_rows, empty_split

    if data_dir is not None:
        root = Path(data_dir).expanduser()
        if not root.is_dir():
            raise DataNotFoundError(f"--data-dir {data_dir!r} does not exist or is not a directory. Point it at a "
                                    "folder of parquet/CSV/JSON files named by split (e.g. ../shared/data/sst2/data).")
        groups = _data_files(root)
        if not groups:
            raise DataNotFoundError(f"{root} holds no *.parquet, *.csv, *.json or *.jsonl files")
        for name in SPLIT_ALIASES.get(split, (split,)):
            if name in groups:
                files = groups[name]
                kinds = {DATA_SUFFIXES[f.suffix] for f in files}
                if len(kinds) > 1:
                    raise DataNotFoundError(f"split {name!r} in {root} mixes file types {sorted(kinds)}: keep one")
                kind = kinds.pop()
                options = {"encoding": encoding} if (encoding and kind == "csv") else {}
                if kind == "parquet":  # a corrupt file or no rows: one line, not a DatasetGenerationError
                    check_parquet_files(files, split, root)
                try:
                    ds = datasets.load_dataset(kind, data_files={name: [str(f) for f in files]}, split=name, **options)
                except Exception as exc:  # noqa: BLE001 - datasets wraps the decode error in its own
                    cause = _decode_error(exc)
                    if cause is None and "corresponds to no data" in str(exc):  # a CSV/JSON file of no rows
                        raise empty_split(split, root, files) from None
                    if cause is None:
                        raise
                    raise ValueError(f"{', '.join(str(f) for f in files)} is not {encoding or 'UTF-8'} text ({cause}): "
                                     "re-save it as UTF-8 (e.g. iconv -f latin1 -t utf-8 IN > OUT) or name its "
                                     "encoding with encoding='latin-1' (recipes: --task-kwargs "
                                     "'{\"encoding\": \"latin-1\"}')") from None
                check_split_rows(ds, split, root, files)
                return ds
        raise DataNotFoundError(f"no {split!r} split in {root}: found splits {sorted(groups)} (file names must start "
                                f"with the split name, e.g. '{SPLIT_ALIASES.get(split, (split,))[0]}-00000-of-00001.parquet').")
    if hub_name is None:
        raise DataNotFoundError("this task has no hub data set: pass --data-dir with a local copy.")
    try:
        ds = datasets.load_dataset(hub_name, hub_config, trust_remote_code=trust_remote_code) \
            if trust_remote_code else datasets.load_dataset(hub_name, hub_config)
    except Exception as exc:  # noqa: BLE001 - offline, missing or forbidden: the same fix
        remote = (" The data set runs its own code: if you trust it, pass trust_remote_code=True (recipes: "
                  "--task-kwargs '{\"trust_remote_code\": true}').") if "trust_remote_code" in str(exc) else ""
        raise DataNotFoundError(
            f"could not load {hub_name!r} from the Hugging Face hub ({type(exc).__name__}: {str(exc)[:200]}). "
            "With no network, pass --data-dir with a local copy (parquet/CSV/JSON files named by split). "
            f"robustkd never substitutes other data.{remote}") from exc
    for name in SPLIT_ALIASES.get(split, (split,)):
        if name in ds:
            check_split_rows(ds[name], split, hub_name)
            return ds[name]
    raise DataNotFoundError(f"{hub_name!r} has splits {list(ds)}, none of them {split!r}")


def _decode_error(exc: BaseException | None) -> str | None:
    """The UnicodeDecodeError somewhere in ``exc``'s chain, as text; None when there is none."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, UnicodeDecodeError):
            return f"byte 0x{exc.object[exc.start]:02x} at position {exc.start} is not valid {exc.encoding}"
        exc = exc.__cause__ or exc.__context__
    return None


class TextDataset(Dataset):
    """Tokenised texts; items are ``{"input_ids", "word_ids", "labels", "text"}``."""

    def __init__(self, texts: list[str], encodings: list[dict[str, list[int]]], labels: list[int]):
        self.texts, self.encodings, self.labels = texts, encodings, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> Batch:
        return {**self.encodings[i], "labels": self.labels[i], "text": self.texts[i]}


# -- the task -------------------------------------------------------------------------------
class TextClassification(Task):
    """Sequence classification of texts with any Hugging Face ``AutoModelForSequenceClassification``.

    The default threat model is a per-token L2 ball of radius ``eps * ||e_t||`` around each
    (non-special, non-padding) token embedding ``e_t``; ``norm="linf"`` uses an L-inf box of
    half-width ``eps * ||e_t||_2``.
    """

    modality = "text"
    default_train_attack = "embedding_pgd"
    default_eval_attacks = ("embedding_pgd20", "token_substitution")

    def __init__(self, name: str = "text_classification", *, data_dir: str | None = None,
                 hub_name: str | None = None, hub_config: str | None = None, text_column: str | None = None,
                 label_column: str | None = None, num_classes: int | None = None, tokenizer: Any = None,
                 max_length: int = 128, trust_remote_code: bool = False, eps: float = 0.1, norm: str = "l2",
                 drop_empty: bool = False, encoding: str | None = None, force_tokenizer: bool = False):
        if max_length < 4:
            raise ValueError(f"max_length must be at least 4 tokens, got {max_length}")
        self.name = name
        self.data_dir = str(data_dir) if data_dir is not None else None
        self.hub_name, self.hub_config = hub_name, hub_config
        self.text_column, self.label_column = text_column, label_column
        self._num_classes = num_classes
        self.max_length, self.trust_remote_code = int(max_length), bool(trust_remote_code)
        self.eps, self.norm, self.drop_empty = float(eps), check_norm(norm), drop_empty
        self.encoding, self.force_tokenizer = encoding, bool(force_tokenizer)
        self.label_names: list[str] | None = None
        self.truncated: dict[str, int] = {}
        self._datasets: dict[str, TextDataset] = {}
        self.tokenizer: Any = None  # a transformers fast tokenizer, once set (set_tokenizer)
        self.tokenizer_source: str | None = None
        if tokenizer is not None:
            self.set_tokenizer(tokenizer)

    @classmethod
    def for_model(cls, model: nn.Module, tokenizer: Any, **kwargs: Any) -> TextClassification:
        """A data-less task around a model and its tokenizer (for :mod:`robustkd.hf`)."""
        num = getattr(getattr(unwrap(model), "config", None), "num_labels", None)
        if num is None:
            raise ValueError("the model has no config.num_labels: pass a transformers sequence-classification model")
        task = cls(kwargs.pop("name", "text_classification"), num_classes=int(num), tokenizer=tokenizer, **kwargs)
        task.check_vocabulary(model)
        task.check_tokenizer_source(model)
        return task

    # -- tokenizer ------------------------------------------------------------------------
    def set_tokenizer(self, tokenizer: Any) -> None:
        """Use ``tokenizer`` (an object, a hub name or a local directory); it must be a fast tokenizer
        because word boundaries (for the word budget of token substitution) come from it."""
        if isinstance(tokenizer, (str, Path)):
            from transformers import AutoTokenizer

            source = str(tokenizer)
            tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=self.trust_remote_code)
            self.tokenizer_source = source
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(f"{type(tokenizer).__name__} is a slow tokenizer: robustkd needs a fast one (word "
                             "boundaries); load it with AutoTokenizer.from_pretrained(..., use_fast=True)")
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no padding token: set tokenizer.pad_token (e.g. to eos_token) first")
        self.tokenizer = tokenizer
        self._special_ids = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
        self._datasets.clear()

    def _need_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise ValueError(f"the task {self.name!r} has no tokenizer yet: call task.build_model(name) first "
                             "(it loads the model's tokenizer) or pass tokenizer=... to the task")
        return self.tokenizer

    def encode(self, texts: list[str], labels: list[int] | Tensor | None = None) -> Batch:
        """Tokenise and pad raw texts into a batch (truncated to ``max_length`` tokens)."""
        self._need_tokenizer()
        enc = self._encode_many(list(texts))[0]
        items = [{**e, "text": t, "labels": 0 if labels is None else int(labels[i])} for i, (e, t) in enumerate(zip(enc, texts))]
        batch = self.collate(items)
        if labels is None:
            del batch["labels"]
        return batch

    def _encode_many(self, texts: list[str]) -> tuple[list[dict[str, list[int]]], list[bool]]:
        """Tokenise in one batched call; also say which texts were longer than ``max_length``."""
        tok = self.tokenizer
        full_lengths = [len(ids) for ids in tok(texts, truncation=False, add_special_tokens=True)["input_ids"]]
        enc = tok(texts, truncation=True, max_length=self.max_length, add_special_tokens=True)
        out = []
        for i in range(len(texts)):
            item = {"input_ids": list(enc["input_ids"][i]),
                    "word_ids": [-1 if w is None else int(w) for w in enc.word_ids(i)]}
            if "token_type_ids" in enc:
                item["token_type_ids"] = list(enc["token_type_ids"][i])
            out.append(item)
        return out, [n > self.max_length for n in full_lengths]

    # -- data -----------------------------------------------------------------------------
    def raw(self, split: str) -> Any:
        """The split as a ``datasets.Dataset`` before tokenisation."""
        return load_raw_split(self.data_dir, self.hub_name, self.hub_config, split, self.trust_remote_code,
                              self.encoding)

    def columns(self, split: str = "train") -> tuple[str, str]:
        cols = list(self.raw(split).column_names)
        return (pick_column(cols, self.text_column, TEXT_COLUMNS, "text"), pick_column(cols, self.label_column, LABEL_COLUMNS, "label"))

    @property
    def num_classes(self) -> int:  # type: ignore[override]
        """Given, or read from the label column (its ClassLabel names, else the largest label + 1)."""
        if self._num_classes is None:
            ds = self.raw("train")
            _, lcol = self.columns("train")
            feature = ds.features.get(lcol)
            names = getattr(feature, "names", None)
            if names:
                self.label_names = list(names)
                self._num_classes = len(names)
            else:
                values = ds[lcol]
                if values and isinstance(values[0], str):
                    self.label_names = sorted(set(values))
                    self._num_classes = len(self.label_names)
                else:
                    self._num_classes = int(max(values)) + 1 if values else 0
        return self._num_classes

    @num_classes.setter
    def num_classes(self, value: int) -> None:
        self._num_classes = int(value)

    def dataset(self, split: str) -> TextDataset:
        if split not in self._datasets:
            self._need_tokenizer()
            ds = self.raw(split)
            tcol, lcol = self.columns(split)
            texts, labels = list(ds[tcol]), list(ds[lcol])
            labels = self._label_ids(labels, split)
            texts, labels = self._check_texts(texts, labels, split)
            encodings, cuts = self._encode_many(texts)
            truncated = sum(cuts)
            self.truncated[split] = truncated
            if truncated:
                warnings.warn(f"{self.name} {split}: {truncated} of {len(texts)} texts are longer than max_length="
                              f"{self.max_length} tokens and were truncated (raise max_length to keep them whole)",
                              stacklevel=2)
            self._datasets[split] = TextDataset(texts, encodings, labels)
        return self._datasets[split]

    def _label_ids(self, labels: list[Any], split: str) -> list[int]:
        if labels and isinstance(labels[0], str):
            names = self.label_names or sorted(set(labels))
            unknown = sorted(set(labels) - set(names))
            if unknown:
                raise ValueError(f"{self.name} {split}: labels {unknown[:5]} are not among the train labels {names}")
            index = {n: i for i, n in enumerate(names)}
            labels = [index[v] for v in labels]
        n = self.num_classes
        bad = [(i, v) for i, v in enumerate(labels) if v is None or not (0 <= int(v) < n)]
        if bad:
            i, v = bad[0]
            raise ValueError(f"{self.name} {split}: {len(bad)} labels lie outside 0..{n - 1} (the model's num_labels="
                             f"{n}), first at row {i}: {v!r}. Unlabelled splits (label -1, e.g. GLUE test) cannot be "
                             "evaluated; otherwise set num_classes to match the data or fix the label column.")
        return [int(v) for v in labels]

    def _check_texts(self, texts: list[Any], labels: list[int], split: str) -> tuple[list[str], list[int]]:
        empty = [i for i, t in enumerate(texts) if not isinstance(t, str) or not t.strip()]
        if empty and not self.drop_empty:
            raise ValueError(f"{self.name} {split}: {len(empty)} texts are empty or not strings (first at row "
                             f"{empty[0]}: {texts[empty[0]]!r}). Clean the data or pass drop_empty=True to drop them (recipes: "
                             "--task-kwargs '{\"drop_empty\": true}').")
        if empty:
            keep = sorted(set(range(len(texts))) - set(empty))
            warnings.warn(f"{self.name} {split}: dropped {len(empty)} empty texts (drop_empty=True)", stacklevel=3)
            texts, labels = [texts[i] for i in keep], [labels[i] for i in keep]
        return texts, labels

    def collate(self, examples: list[Batch]) -> Batch:
        """Pad to the longest example: ``input_ids``, ``attention_mask``, (``token_type_ids``),
        ``word_ids`` (-1 for special tokens and padding), ``labels`` and the raw ``text``."""
        tok = self._need_tokenizer()
        n, length = len(examples), max(len(e["input_ids"]) for e in examples)
        ids = torch.full((n, length), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((n, length), dtype=torch.long)
        words = torch.full((n, length), -1, dtype=torch.long)
        types = torch.zeros((n, length), dtype=torch.long) if "token_type_ids" in examples[0] else None
        left = tok.padding_side == "left"
        for i, e in enumerate(examples):
            k = len(e["input_ids"])
            sl = slice(length - k, length) if left else slice(0, k)
            ids[i, sl] = torch.tensor(e["input_ids"])
            mask[i, sl] = 1
            words[i, sl] = torch.tensor(e["word_ids"])
            if types is not None:
                types[i, sl] = torch.tensor(e["token_type_ids"])
        batch: Batch = {"input_ids": ids, "attention_mask": mask, "word_ids": words,
                        "labels": torch.tensor([int(e["labels"]) for e in examples], dtype=torch.long),
                        "text": [e.get("text", "") for e in examples]}
        if types is not None:
            batch["token_type_ids"] = types
        return batch

    def collate_fn(self, split: str) -> Callable[[list[Batch]], Batch]:
        return self.collate

    def validate_batch(self, batch: Batch) -> None:
        super().validate_batch(batch)
        for key in ("input_ids", "attention_mask"):
            if key not in batch:
                raise ValueError(f"a text batch needs {key!r}; it has {sorted(batch)} (tokenise with the task's "
                                 "tokenizer, or use task.collate_fn)")
        ids = batch["input_ids"]
        if ids.dim() != 2 or ids.dtype != torch.long:
            raise ValueError(f"input_ids must be a 2-D long tensor, got {ids.dtype} of shape {tuple(ids.shape)}")

    # -- models ---------------------------------------------------------------------------
    def build_model(self, name: str, **kwargs: Any) -> nn.Module:
        """``AutoModelForSequenceClassification`` from a hub name or local directory with this task's
        ``num_labels`` (a new head when the checkpoint has another); loads the matching tokenizer
        when the task has none. ``trust_remote_code`` stays off unless the task was built with it."""
        from transformers import AutoModelForSequenceClassification

        kwargs.setdefault("trust_remote_code", self.trust_remote_code)
        try:
            model = AutoModelForSequenceClassification.from_pretrained(
                name, num_labels=self.num_classes, ignore_mismatched_sizes=True, **kwargs)
        except OSError as exc:
            raise DataNotFoundError(f"could not load the model {name!r} ({str(exc)[:300]}). Offline, pass a local "
                                    "directory (e.g. ../shared/models/all-MiniLM-L6-v2).") from exc
        if self.tokenizer is None:
            self.set_tokenizer(name)
        self.check_vocabulary(model)  # the plainer fault first: ids beyond the embedding table
        self.check_tokenizer_source(model)
        return model

    def check_tokenizer_source(self, model: nn.Module) -> None:
        """Refuse a tokenizer saved from another model than ``model`` (compared by the last part of each one's
        name or path: ``org/name`` and a local ``.../name`` copy agree) unless the task has ``force_tokenizer``.
        A tokenizer of another model can share the vocabulary size yet map words to other ids, so when the names
        agree (or the tokenizer has none) but the tokenizer was not loaded from the model's own files, its
        vocabulary is compared with the tokenizer saved with the model (else its padding id with the model's)."""
        tok = self._need_tokenizer()
        tok_name = str(getattr(tok, "name_or_path", "") or "")
        model_name = str(getattr(getattr(unwrap(model), "config", None), "_name_or_path", "") or "")
        if self.force_tokenizer or not model_name:
            return
        fix = ("Use the model's own tokenizer, or pass force_tokenizer=True if they are the same (recipes: "
               "--task-kwargs '{\"force_tokenizer\": true}')")
        if tok_name:
            a, b = Path(tok_name.rstrip("/")).name.lower(), Path(model_name.rstrip("/")).name.lower()
            if a != b:
                raise ValueError(f"the tokenizer comes from {tok_name!r} but the model from {model_name!r}: another "
                                 f"model's tokenizer maps words to other ids. {fix}")
            if tok_name.rstrip("/") == model_name.rstrip("/"):
                return  # loaded from the model's own files
        # the same last name (or no name) is not the same tokenizer: compare with the one saved with the model
        own = self._own_tokenizer(model_name)
        if own is not None:
            mine, theirs = tok.get_vocab(), own.get_vocab()
            if mine != theirs:
                moved = sorted(t for t in set(mine) | set(theirs) if mine.get(t) != theirs.get(t))
                t = moved[0]
                raise ValueError(f"the tokenizer{f' from {tok_name!r}' if tok_name else ''} is not the one saved with "
                                 f"the model {model_name!r}: {len(moved)} tokens have other ids (e.g. {t!r}: "
                                 f"{mine.get(t)} here, {theirs.get(t)} in the model's), so words would map to the "
                                 f"wrong embeddings. {fix}")
            return
        pad = getattr(getattr(unwrap(model), "config", None), "pad_token_id", None)
        if pad is not None and tok.pad_token_id is not None and int(pad) != int(tok.pad_token_id):
            raise ValueError(f"the tokenizer pads with id {tok.pad_token_id} ({tok.pad_token!r}) but the model "
                             f"{model_name!r} was built with pad_token_id={pad}: this is not the model's tokenizer. {fix}")

    def _own_tokenizer(self, model_name: str) -> Any:
        """The tokenizer saved with the model (its directory, or the local hub cache); None when there is none."""
        from transformers import AutoTokenizer

        path = Path(model_name).expanduser()
        if path.is_dir() and not any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json",
                                                                   "vocab.txt", "vocab.json", "spiece.model")):
            return None
        try:
            return AutoTokenizer.from_pretrained(str(path) if path.is_dir() else model_name, local_files_only=True,
                                                 trust_remote_code=self.trust_remote_code)
        except Exception:  # noqa: BLE001 - no tokenizer with the model (or not cached): the name check stands
            return None

    def check_vocabulary(self, model: nn.Module) -> None:
        """Refuse a tokenizer whose ids do not fit the model's embedding table."""
        tok = self._need_tokenizer()
        rows = input_embeddings(model).num_embeddings
        size = len(tok)
        if size > rows:
            raise ValueError(f"the tokenizer ({type(tok).__name__}, {size} tokens) does not match the model's vocabulary "
                             f"({rows} embeddings): load the tokenizer that belongs to the model")
        cfg_size = getattr(getattr(unwrap(model), "config", None), "vocab_size", None)
        if cfg_size is not None and abs(int(cfg_size) - size) > 0 and size < 0.5 * int(cfg_size):
            raise ValueError(f"the tokenizer has {size} tokens but the model was built for {cfg_size}: this is "
                             "not the model's tokenizer")

    def check_model(self, model: nn.Module, batch: Batch) -> None:
        self.check_vocabulary(model)
        ids = batch["input_ids"]
        rows = input_embeddings(model).num_embeddings
        if int(ids.max()) >= rows:
            raise ValueError(f"token id {int(ids.max())} is outside the model's {rows} embeddings: the data were "
                             "tokenised with another tokenizer")
        super().check_model(model, batch)

    # -- attack space ---------------------------------------------------------------------
    def embeddings(self, model: nn.Module, input_ids: Tensor) -> Tensor:
        """``model``'s own input (word) embeddings of ``input_ids``."""
        return input_embeddings(model)(input_ids)

    def perturbation_base(self, model: nn.Module, batch: Batch) -> Tensor:
        return self.embeddings(model, batch["input_ids"])

    def special_mask(self, input_ids: Tensor) -> Tensor:
        """True where a token is a special token ([CLS], [SEP], [PAD], ...)."""
        return torch.isin(input_ids, self._special_ids.to(input_ids.device))

    def perturbation_mask(self, batch: Batch) -> Tensor:
        """1 for real, non-special tokens; 0 for padding and special tokens."""
        self._need_tokenizer()
        ids = batch["input_ids"]
        return batch["attention_mask"].bool() & ~self.special_mask(ids)

    def logits(self, model: nn.Module, batch: Batch, delta: Tensor | None = None) -> Tensor:
        emb = self.embeddings(model, batch["input_ids"])
        if delta is not None:
            emb = emb + delta.to(emb.dtype)
        kwargs = {"attention_mask": batch["attention_mask"]}
        if "token_type_ids" in batch:
            kwargs["token_type_ids"] = batch["token_type_ids"]
        out = model(inputs_embeds=emb, **kwargs)
        return out.logits if hasattr(out, "logits") else out[0]

    def load_pretrained(self, spec: str, **options: Any) -> nn.Module | None:
        """A Hugging Face sequence classifier (hub name or local directory) for this task: the
        ``Task.load_pretrained`` hook, through :meth:`build_model`."""
        return self.build_model(str(spec), **options)

    def threat_model(self, eps: float | None = None, norm: str | None = None, **kwargs: Any) -> ThreatModel:
        """Per-token ball, radius ``eps`` times each token embedding's L2 norm; no domain clamp."""
        if kwargs:
            raise TypeError(f"unknown threat-model options {sorted(kwargs)} for a text task (eps, norm)")
        return ThreatModel(self.eps if eps is None else eps, check_norm(norm or self.norm), domain=None, per_token=True,
                           relative=True)


@register_task("hf_text", hf_input="input_ids")
def hf_text(model: nn.Module, processor: Any = None, **kwargs: Any) -> TextClassification:
    """Any transformers sequence classifier (``input_ids`` in) and its tokenizer inside RobustTrainer;
    eps/norm/max_length options."""
    if processor is None:
        raise ValueError("a text model needs its tokenizer: pass processing_class=<tokenizer> to RobustTrainer")
    return TextClassification.for_model(model, processor, name="hf_text", **kwargs)


@register_task("text_classification")
def text_classification(data_dir: str | None = None, **kwargs: Any) -> TextClassification:
    """Any text classification data (local parquet/CSV/JSON or hub_name=...), text/label columns as options."""
    return TextClassification("text_classification", data_dir=data_dir, **kwargs)


@register_task("sst2")
def sst2(data_dir: str | None = None, **kwargs: Any) -> TextClassification:
    """GLUE SST-2 sentiment (2 classes; hub: stanfordnlp/sst2; columns sentence/label)."""
    kwargs.setdefault("text_column", "sentence")
    kwargs.setdefault("label_column", "label")
    kwargs.setdefault("num_classes", 2)
    kwargs.setdefault("max_length", 64)
    return TextClassification("sst2", data_dir=data_dir, hub_name="stanfordnlp/sst2", **kwargs)
