"""Text attacks: embedding-space PGD, gradient-guided token substitution, and a TextAttack adapter.

* ``embedding_pgd`` is the shared :class:`~robustkd.attacks.pgd.PGD` with the text task's per-token
  threat model (a ball around each token embedding, radius relative to that embedding's norm,
  padding and special tokens masked): no second PGD loop.
* ``token_substitution`` is HotFlip-style (Ebrahimi et al. 2018): first-order scores
  ``(e_new - e_old) . grad`` pick, one word at a time, the substitution that most raises the loss,
  within a bounded fraction of the words; never special tokens or padding. It returns a new batch
  (discrete), so it serves training (``Method.prepare``) and evaluation alike.
* ``textattack`` runs any TextAttack recipe by name (``textattack:deepwordbug``) on a robustkd task
  and model, and keeps per-example results: accuracy under attack, success rate, fraction of words
  perturbed, queries, successful examples.

These attacks require the :class:`~robustkd.attacks.base.EmbeddingInputs` capability (``tokenizer``,
``max_length``, ``encode``, ``embeddings``, ``special_mask``), which the built-in text task provides.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import send_to_device
from torch import Tensor, nn

from ..registry import register_attack
from ..task import Adversarial, Batch, Task
from ..threat import ThreatModel
from .base import Attack, EmbeddingInputs, check_capabilities, embedding_inputs, victim_mode
from .pgd import OBJECTIVES, PGD


def _victim_embeddings(model: nn.Module) -> nn.Embedding:
    from ..teachers import unwrap

    module = unwrap(model)
    get = getattr(module, "get_input_embeddings", None)
    if not callable(get):
        raise TypeError(f"token substitution swaps rows of the victim's input embedding table, which it reads with "
                        f"get_input_embeddings() (a Hugging Face model's); {type(module).__name__} has none")
    return get()


# -- embedding-space PGD ----------------------------------------------------------------------
@register_attack("embedding_pgd")
def embedding_pgd(task: Task, threat: ThreatModel | None = None, *, eps: float | None = None,
                  norm: str | None = None, steps: int = 10, rel_step_size: float | None = None,
                  **kwargs: Any) -> PGD:
    """PGD in each model's own token-embedding space (per-token L2 or L-inf ball, relative radius)."""
    check_capabilities(embedding_pgd, task)
    threat = threat if threat is not None else task.threat_model(eps=eps, norm=norm)
    if not threat.per_token:
        raise ValueError("embedding_pgd needs a per-token threat model (ThreatModel(..., per_token=True))")
    if rel_step_size is None and kwargs.get("step_size") is None:
        rel_step_size = 2.5 / steps  # Madry's rule of thumb, relative to each token's radius
    return PGD(task, threat, steps=steps, rel_step_size=rel_step_size, **kwargs)


embedding_pgd.requires = (EmbeddingInputs,)  # type: ignore[attr-defined]


# -- HotFlip-style token substitution ----------------------------------------------------------
@register_attack("token_substitution")
class TokenSubstitution(Attack):
    """Greedy gradient-guided word substitution within ``fraction`` of each text's words.

    Each round takes the gradient of the loss with respect to the victim's input embeddings, scores
    every (position, vocabulary token) swap by ``(e_new - e_old) . grad`` and applies the best swap
    per example; a word, once changed, is frozen. Candidates are whole-word alphabetic tokens (no
    ``##`` pieces, no special or unused tokens). With hard labels, examples already misclassified
    stop early (``stop_on_success``). At least one word is changed in any text with a word.
    """

    requires = (EmbeddingInputs,)

    def __init__(self, task: Task, *, fraction: float = 0.1, max_words: int | None = None, loss: str = "ce",
                 stop_on_success: bool = True, candidates: int | None = None):
        super().__init__(task)
        self.text = embedding_inputs(task)
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"token_substitution's fraction of words must be in (0, 1], got {fraction}")
        if loss not in OBJECTIVES:
            raise ValueError(f"unknown objective {loss!r}; choose one of {sorted(OBJECTIVES)}")
        self.fraction, self.max_words, self.loss_name = float(fraction), max_words, loss
        self.objective = OBJECTIVES[loss]
        self.stop_on_success = stop_on_success
        self.candidates = candidates  # restrict to the first N allowed vocabulary ids (smaller search)
        self._vocab_cache: dict[tuple[int, str], Tensor] = {}

    def vocab_mask(self, size: int, device: torch.device) -> Tensor:
        """Vocabulary ids that may be substituted in: whole-word alphabetic, non-special tokens."""
        key = (size, str(device))
        if key not in self._vocab_cache:
            tok = self.text.tokenizer
            tokens = tok.convert_ids_to_tokens(list(range(min(size, len(tok)))))
            special = set(tok.all_special_ids)
            ok = torch.zeros(size, dtype=torch.bool)
            count = 0
            for i, t in enumerate(tokens):
                if t is None or i in special or t.startswith("##") or t.startswith("[") or t.startswith("<"):
                    continue
                word = t.lstrip("\u0120\u2581")  # BPE / SentencePiece word-start markers
                if word.isalpha():
                    ok[i] = True
                    count += 1
                    if self.candidates is not None and count >= self.candidates:
                        break
            if not ok.any():
                raise ValueError("token_substitution found no whole-word alphabetic tokens in the tokenizer's vocabulary")
            self._vocab_cache[key] = ok.to(device)
        return self._vocab_cache[key]

    def budgets(self, batch: Batch, allowed: Tensor) -> Tensor:
        """Words each example may change: ``max(1, floor(fraction * words))`` (0 for a text with none)."""
        if "word_ids" not in batch:
            raise ValueError("token_substitution bounds changed *words* and needs the batch's 'word_ids' (-1 for "
                             "special tokens and padding): build batches with the text task's collate_fn or "
                             "task.encode")
        words = batch["word_ids"].masked_fill(~allowed, -1)
        n_words = torch.stack([torch.unique(w[w >= 0]).numel() * torch.ones((), dtype=torch.long, device=w.device)
                               for w in words])
        budget = torch.clamp(torch.floor(self.fraction * n_words.float()).long(), min=1)
        budget = torch.where(n_words > 0, budget, torch.zeros_like(budget))
        if self.max_words is not None:
            budget = budget.clamp(max=self.max_words)
        return budget

    def perturb(self, model: nn.Module, batch: Batch, targets: Tensor | None = None) -> Adversarial:
        task = self.task
        targets = task.labels(batch) if targets is None else targets
        hard = targets.dim() == 1
        ids = batch["input_ids"].clone()
        mask = task.perturbation_mask(batch)  # None: every position may move (the Task contract)
        allowed = mask.clone() if mask is not None else torch.ones_like(ids, dtype=torch.bool)
        budget = self.budgets(batch, allowed)
        words = batch["word_ids"]
        table = _victim_embeddings(model).weight
        vocab_ok = self.vocab_mask(table.shape[0], table.device)
        changed = torch.zeros_like(budget)
        active = budget > 0
        for _ in range(int(budget.max()) if budget.numel() else 0):
            current = {**batch, "input_ids": ids}
            base = task.perturbation_base(model, current).detach()
            zero = torch.zeros_like(base, requires_grad=True)
            logits = task.logits(model, current, zero)
            if self.stop_on_success and hard:
                active &= logits.argmax(1) == targets
            if not active.any():
                break
            (grad,) = torch.autograd.grad(self.objective(logits, targets).sum(), zero)
            grad = grad.detach()
            positions = allowed & active[:, None]
            if not positions.any():
                break
            b_idx, p_idx = positions.nonzero(as_tuple=True)
            g = grad[b_idx, p_idx].to(table.dtype)  # (P, d)
            scores = g @ table.detach().T - (g * base[b_idx, p_idx].to(table.dtype)).sum(-1, keepdim=True)
            scores = scores.masked_fill(~vocab_ok, float("-inf"))
            scores[torch.arange(len(b_idx), device=scores.device), ids[b_idx, p_idx]] = float("-inf")
            best_val, best_tok = scores.max(1)
            # per example, the best position among its candidates
            per_example = torch.full((ids.shape[0],), float("-inf"), device=ids.device)
            per_example = per_example.scatter_reduce(0, b_idx, best_val.float(), reduce="amax")
            winner = (best_val.float() == per_example[b_idx]) & torch.isfinite(best_val)
            chosen = torch.full((ids.shape[0],), -1, dtype=torch.long, device=ids.device)
            order = torch.arange(len(b_idx), device=ids.device)
            chosen.scatter_reduce_(0, b_idx[winner], order[winner], reduce="amax", include_self=True)
            apply = chosen >= 0
            if not apply.any():
                break
            k = chosen[apply]
            ex, pos, tok = b_idx[k], p_idx[k], best_tok[k]
            ids[ex, pos] = tok
            frozen = words[ex] == words[ex, pos][:, None]  # every piece of the changed word
            allowed[ex] &= ~frozen
            changed[ex] += 1
            active &= changed < budget
        new_batch = {**batch, "input_ids": ids, "words_changed": changed}
        if "text" in batch and self.text.tokenizer is not None:
            new_batch["text"] = self.text.tokenizer.batch_decode(ids, skip_special_tokens=True)
        return Adversarial(new_batch, None)

    def describe(self) -> dict[str, Any]:
        return {"attack": "token_substitution", "fraction_of_words": self.fraction, "max_words": self.max_words,
                "loss": self.loss_name, "stop_on_success": self.stop_on_success, "candidates": self.candidates}


# -- TextAttack ---------------------------------------------------------------------------------
class ResourceMissingError(RuntimeError):
    """A TextAttack recipe needs a model, word list or package this machine does not have."""


@dataclass(frozen=True)
class Resource:
    name: str
    available: Callable[[], bool]
    how: str


def _nltk_has(path: str) -> bool:
    import nltk

    for candidate in (path, path + ".zip"):
        try:
            nltk.data.find(candidate)
            return True
        except LookupError:
            continue
    return False


def _ta_cache_has(path: str) -> bool:
    from textattack.shared.utils import path_in_cache

    return os.path.exists(path_in_cache(path))


def _importable(*modules: str) -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in modules)


def _hf_cached(repo: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo, "config.json"), str)
    except Exception:  # noqa: BLE001
        return False


_NLTK_HOW = "download it where there is network (python -m nltk.downloader {pkg}) and point NLTK_DATA at that folder"
STOPWORDS = Resource("NLTK stopwords", lambda: _nltk_has("corpora/stopwords"),
                     _NLTK_HOW.format(pkg="stopwords") + " (e.g. NLTK_DATA=../shared/data/nltk_data)")
WORDNET = Resource("NLTK wordnet + omw-1.4", lambda: _nltk_has("corpora/wordnet") and _nltk_has("corpora/omw-1.4"),
                   _NLTK_HOW.format(pkg="wordnet omw-1.4"))
POS_TAGGER = Resource("NLTK averaged_perceptron_tagger + universal_tagset",
                      lambda: (_nltk_has("taggers/averaged_perceptron_tagger") or _nltk_has("taggers/averaged_perceptron_tagger_eng"))
                      and _nltk_has("taggers/universal_tagset"),
                      _NLTK_HOW.format(pkg="averaged_perceptron_tagger averaged_perceptron_tagger_eng universal_tagset"))
COUNTERFITTED = Resource("TextAttack counter-fitted word embeddings (word_embeddings/paragramcf)",
                         lambda: _ta_cache_has("word_embeddings/paragramcf"),
                         "build the recipe once where there is network (TextAttack downloads it to ~/.cache/textattack), "
                         "then copy that cache here and set TA_CACHE_DIR to it")
USE = Resource("Universal Sentence Encoder (TensorFlow Hub)", lambda: _importable("tensorflow", "tensorflow_hub"),
               "install tensorflow and tensorflow_hub and cache https://tfhub.dev/google/universal-sentence-encoder/4 "
               "(TFHUB_CACHE_DIR) where there is network; robustkd does not ship TensorFlow")


def _masked_lm(repo: str) -> Resource:
    return Resource(f"Hugging Face masked LM {repo!r}", lambda: _hf_cached(repo),
                    f"download {repo} into the Hugging Face cache where there is network (huggingface-cli download "
                    f"{repo}) and copy the cache here (HF_HOME)")


HOWNET = Resource("OpenHowNet sememe data", lambda: _importable("OpenHowNet"), "pip install OpenHowNet and run OpenHowNet.download() online")
GOOGLE_LM = Resource("TextAttack Google 1-billion-word language model", lambda: _ta_cache_has("constraints/semantics/language-models/alzantot-goog-lm"),
                     "build the recipe once online (TextAttack caches it), copy ~/.cache/textattack and set TA_CACHE_DIR")
GPT2 = Resource("Hugging Face model 'gpt2'", lambda: _hf_cached("gpt2"), "huggingface-cli download gpt2 online, copy HF_HOME")

# name -> (TextAttack recipe class, resources it needs)
TEXTATTACK_RECIPES: dict[str, tuple[str, tuple[Resource, ...]]] = {
    "deepwordbug": ("DeepWordBugGao2018", (STOPWORDS,)),
    "pruthi": ("Pruthi2019", ()),
    "input-reduction": ("InputReductionFeng2018", ()),
    "textbugger": ("TextBuggerLi2018", (STOPWORDS, COUNTERFITTED, USE)),
    "textfooler": ("TextFoolerJin2019", (STOPWORDS, COUNTERFITTED, POS_TAGGER, USE)),
    "pwws": ("PWWSRen2019", (STOPWORDS, WORDNET)),
    "bae": ("BAEGarg2019", (STOPWORDS, _masked_lm("bert-base-uncased"), POS_TAGGER, USE)),
    "bert-attack": ("BERTAttackLi2020", (STOPWORDS, _masked_lm("bert-base-uncased"), USE)),
    "hotflip": ("HotFlipEbrahimi2017", (STOPWORDS, COUNTERFITTED, POS_TAGGER)),
    "alzantot": ("GeneticAlgorithmAlzantot2018", (STOPWORDS, COUNTERFITTED, GOOGLE_LM)),
    "faster-alzantot": ("FasterGeneticAlgorithmJia2019", (STOPWORDS, COUNTERFITTED)),
    "iga": ("IGAWang2019", (STOPWORDS, COUNTERFITTED)),
    "pso": ("PSOZang2020", (STOPWORDS, HOWNET)),
    "kuleshov": ("Kuleshov2017", (STOPWORDS, COUNTERFITTED, GPT2, USE)),
    "clare": ("CLARE2020", (STOPWORDS, _masked_lm("distilroberta-base"), USE)),
    "a2t": ("A2TYoo2021", (STOPWORDS, COUNTERFITTED, POS_TAGGER, _masked_lm("sentence-transformers/stsb-distilbert-base"))),
    "checklist": ("CheckList2020", (Resource("flair NER model 'flair/ner-english'", lambda: _hf_cached("flair/ner-english"),
                                             "huggingface-cli download flair/ner-english online, copy HF_HOME"),)),
    "seq2sick": ("Seq2SickCheng2018BlackBox", (STOPWORDS, COUNTERFITTED)),
}
_RECIPE_ALIASES = {"deepwordbug_gao_2018": "deepwordbug", "textfooler_jin_2019": "textfooler", "pwws_ren_2019": "pwws",
                   "bert_attack": "bert-attack", "input_reduction": "input-reduction", "faster_alzantot": "faster-alzantot"}


def missing_resources(recipe: str) -> list[Resource]:
    """The resources a recipe needs that this machine lacks."""
    return [r for r in TEXTATTACK_RECIPES[_recipe_key(recipe)][1] if not r.available()]


def _recipe_key(recipe: str) -> str:
    key = _RECIPE_ALIASES.get(recipe.lower(), recipe.lower())
    if key not in TEXTATTACK_RECIPES:
        raise ValueError(f"unknown TextAttack recipe {recipe!r}; known: {', '.join(sorted(TEXTATTACK_RECIPES))}")
    return key


def _resource_message(recipe: str, resources: list[Resource], cause: BaseException | None = None) -> str:
    lines = [f"the TextAttack recipe {recipe!r} needs resources this machine does not have:"]
    lines += [f"  - {r.name}: {r.how}" for r in resources]
    if cause is not None:
        lines.append(f"  (TextAttack said: {type(cause).__name__}: {str(cause)[:200]})")
    lines.append("Recipes that work offline here: deepwordbug (with NLTK_DATA), pruthi, input-reduction.")
    return "\n".join(lines)


def _make_wrapper_class() -> type:
    from textattack.models.wrappers import ModelWrapper

    class TaskModelWrapper(ModelWrapper):
        """TextAttack's view of a robustkd model: texts in, logits out, through the task."""

        def __init__(self, task: Task, model: nn.Module, batch_size: int = 32):
            self.task, self.model, self.batch_size = task, model, batch_size
            self.text = embedding_inputs(task)
            self.tokenizer = self.text.tokenizer

        def _device(self) -> torch.device:
            return next(self.model.parameters()).device

        def __call__(self, text_input_list: list[str]) -> Tensor:
            texts = [t if isinstance(t, str) else " ".join(t) for t in text_input_list]
            out = []
            for i in range(0, len(texts), self.batch_size):
                batch = send_to_device(self.text.encode(texts[i:i + self.batch_size]), self._device())
                with torch.no_grad():
                    out.append(self.task.logits(self.model, batch).float().cpu())
            return torch.cat(out) if out else torch.zeros(0, self.task.num_classes)

        def get_grad(self, text_input: str) -> dict[str, Any]:
            """Gradient of the loss at the predicted class w.r.t. the token embeddings (HotFlip, A2T)."""
            batch = send_to_device(self.text.encode([text_input]), self._device())
            base = self.task.perturbation_base(self.model, batch).detach()
            zero = torch.zeros_like(base, requires_grad=True)
            logits = self.task.logits(self.model, batch, zero)
            loss = torch.nn.functional.cross_entropy(logits, logits.argmax(1))
            (grad,) = torch.autograd.grad(loss, zero)
            return {"ids": batch["input_ids"][0].tolist(), "gradient": grad[0].cpu().numpy()}

        def _tokenize(self, inputs: list[str]) -> list[list[str]]:
            return [self.tokenizer.convert_ids_to_tokens(self.tokenizer(x, truncation=True,
                                                                        max_length=self.text.max_length)["input_ids"])
                    for x in inputs]

    return TaskModelWrapper


@register_attack("textattack")
class TextAttackAdapter(Attack):
    """Any TextAttack recipe by name (``textattack:deepwordbug``), run text by text on the victim.

    Returns the batch with successfully attacked texts replaced by their adversarial versions
    (re-tokenised), so ``task.logits(model, *adv)`` gives accuracy under attack. Per-example results
    accumulate in ``records``; :meth:`summary` turns them into the usual TextAttack statistics.
    Recipes whose resources are missing fail up front with :class:`ResourceMissingError` naming them.
    """

    requires = (EmbeddingInputs,)

    def __init__(self, task: Task, recipe: str = "deepwordbug", *, query_budget: int | None = None,
                 batch_size: int = 32, keep_examples: int = 50):
        super().__init__(task)
        self.recipe = _recipe_key(recipe)
        from ..extras import require

        require("textattack.attack_recipes", "text", f"the textattack:{self.recipe} attack")  # fails early
        missing = missing_resources(self.recipe)
        if missing:
            raise ResourceMissingError(_resource_message(self.recipe, missing))

        self.query_budget, self.batch_size, self.keep_examples = query_budget, batch_size, keep_examples
        self.records: list[dict[str, Any]] = []
        self._wrapper: Any = None
        self._attack: Any = None

    def _build(self, model: nn.Module) -> Any:
        import textattack.attack_recipes as recipes

        if self._attack is None:
            self._wrapper = _make_wrapper_class()(self.task, model, self.batch_size)
            try:
                self._attack = getattr(recipes, TEXTATTACK_RECIPES[self.recipe][0]).build(self._wrapper)
            except (OSError, LookupError, ImportError, ConnectionError) as exc:
                raise ResourceMissingError(_resource_message(self.recipe, list(TEXTATTACK_RECIPES[self.recipe][1]), exc)) from exc
            if self.query_budget is not None:
                self._attack.goal_function.query_budget = self.query_budget
            # TextAttack hands the model its candidate texts in chunks of the goal function's batch
            # size; make that the wrapper's, so every query is one forward pass of ``batch_size`` texts
            self._attack.goal_function.batch_size = self.batch_size
        self._wrapper.model = model
        self._attack.clear_cache()  # the model (or its weights) may have changed since the last call
        return self._attack

    def attack_texts(self, model: nn.Module, texts: list[str], labels: list[int]) -> list[dict[str, Any]]:
        """Attack each text; one record per example (status, texts, predictions, queries, words changed)."""
        from textattack.attack_results import FailedAttackResult, SkippedAttackResult, SuccessfulAttackResult

        attack = self._build(model)
        out = []
        for text, label in zip(texts, labels):
            try:
                result = attack.attack(text, int(label))
            except (OSError, LookupError, ImportError, ConnectionError) as exc:
                raise ResourceMissingError(_resource_message(self.recipe, list(TEXTATTACK_RECIPES[self.recipe][1]), exc)) from exc
            original = result.original_result.attacked_text
            perturbed = result.perturbed_result.attacked_text
            status = ("success" if isinstance(result, SuccessfulAttackResult) else
                      "skipped" if isinstance(result, SkippedAttackResult) else
                      "failed" if isinstance(result, FailedAttackResult) else "maximized")
            changed = len(original.all_words_diff(perturbed)) if status == "success" else 0
            out.append({"status": status, "label": int(label), "original_text": original.text,
                        "perturbed_text": perturbed.text,
                        "original_prediction": int(result.original_result.output),
                        "perturbed_prediction": int(result.perturbed_result.output),
                        "num_queries": int(result.perturbed_result.num_queries) if status != "skipped" else 0,
                        "words_changed": changed, "num_words": len(original.words),
                        "fraction_words_changed": changed / max(len(original.words), 1)})
        self.records.extend(out)
        return out

    def perturb(self, model: nn.Module, batch: Batch, targets: Tensor | None = None) -> Adversarial:
        labels = self.task.labels(batch) if targets is None or targets.dim() != 1 else targets
        # TextAttack draws from Python's, NumPy's and torch's generators: seed them all from the evaluation's
        # seed for this batch (robustkd's evaluation sets torch's to seed + batch index before each batch)
        self.last_seed = seed_textattack(torch.initial_seed() % 2**32)
        if "text" not in batch:
            raise ValueError("the TextAttack adapter needs the raw texts in batch['text'] (the text task's collate_fn "
                             "keeps them)")
        records = self.attack_texts(model, list(batch["text"]), labels.tolist())
        texts = [r["perturbed_text"] if r["status"] == "success" else t for r, t in zip(records, batch["text"])]
        new = send_to_device(embedding_inputs(self.task).encode(texts, labels.cpu()), batch["input_ids"].device)
        return Adversarial({**batch, **new}, None)

    def summary(self, records: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """TextAttack's statistics, as fractions: accuracy clean / under attack, success rate, average
        fraction of words perturbed (successful attacks), queries per attacked example, examples."""
        return summarize_textattack(self.records if records is None else records, self.recipe, self.keep_examples)

    def reset(self) -> None:
        self.records = []

    def describe(self) -> dict[str, Any]:
        return {"attack": "textattack", "recipe": self.recipe, "recipe_class": TEXTATTACK_RECIPES[self.recipe][0],
                "query_budget": self.query_budget, "model_batch_size": self.batch_size,
                "seed": "the evaluation's seed + batch index (TextAttack's set_seed before each batch)"}


def seed_textattack(seed: int) -> int:
    """Seed Python's, NumPy's and torch's generators as TextAttack's own ``Attacker`` does
    (``textattack.shared.utils.set_seed(AttackArgs.random_seed)``); returns the seed."""
    from textattack.shared.utils import set_seed

    set_seed(int(seed))
    return int(seed)


def summarize_textattack(records: list[dict[str, Any]], recipe: str, keep_examples: int = 50) -> dict[str, Any]:
    n = len(records)
    count = {s: sum(r["status"] == s for r in records) for s in ("success", "failed", "skipped", "maximized")}
    attacked = n - count["skipped"]
    successes = [r for r in records if r["status"] == "success"]
    return {
        "recipe": recipe, "num_examples": n,
        "clean_accuracy": attacked / n if n else math.nan,
        "accuracy_under_attack": (count["failed"] + count["maximized"]) / n if n else math.nan,
        "attack_success_rate": count["success"] / attacked if attacked else math.nan,
        "avg_fraction_words_perturbed": (sum(r["fraction_words_changed"] for r in successes) / len(successes)
                                         if successes else math.nan),
        "avg_queries_per_example": (sum(r["num_queries"] for r in records if r["status"] != "skipped") / attacked
                                    if attacked else math.nan),
        "counts": count,
        "successful_examples": successes[:keep_examples],
    }


def textattack_evaluate(task: Task, model: nn.Module, texts: list[str], labels: list[int], recipe: str = "deepwordbug",
                        *, query_budget: int | None = None, output: str | Path | None = None,
                        keep_examples: int = 50, batch_size: int = 32, seed: int = 0) -> dict[str, Any]:
    """Evaluate ``model`` under a TextAttack recipe on ``texts``; the summary as a dict (and JSON file).
    The model answers TextAttack's queries ``batch_size`` texts at a time. The random generators are
    seeded with ``seed`` first, as TextAttack's ``Attacker`` seeds them with ``AttackArgs(random_seed=seed)``,
    so the results are those of ``Attacker`` on the same texts; the summary records the seed."""
    if len(texts) != len(labels):
        raise ValueError(f"{len(texts)} texts but {len(labels)} labels")
    adapter = TextAttackAdapter(task, recipe, query_budget=query_budget, keep_examples=keep_examples,
                                batch_size=batch_size)
    with victim_mode(model, adapter.mode):
        adapter._build(model)  # built before seeding, as Attacker gets a built attack
        seed_textattack(seed)
        adapter.attack_texts(model, list(texts), [int(y) for y in labels])
    summary = {**adapter.summary(), "seed": int(seed)}
    if output is not None:
        Path(output).write_text(json.dumps(summary, indent=2))
    return summary
