"""MTEB on the packed runtime: ``MTEBModel`` (mteb >= 2's encoder protocol), local tasks, and
``llm2vec-fast eval mteb``.

Needs the ``[mteb]`` extra. ``MTEBModel`` takes any ``LLM2Vec`` and gives each input the
instruction llm2vec evaluates with: queries and the texts of symmetric tasks (STS, clustering,
classification, ...) get the task's instruction, retrieval documents none. The instruction comes,
first found, from the model folder's sentence-transformers prompts (``prompts``, used as
instructions: attended, not pooled), from llm2vec's task table (``LLM2VEC_TASK_INSTRUCTIONS``),
from the task's own ``prompt``, else none.

Each ``encode`` call collects all of mteb's batches and encodes their distinct texts at once, in
token-budget packed batches sorted by length: mteb's ``batch_size`` changes nothing, and neither
does ``max_batch_tokens`` (the runtime is batch-invariant).

A local task is a JSON file, so that evaluation needs no download::

    {"type": "STS", "name": "MySTS", "data": "pairs.tsv"}
    {"type": "Retrieval", "name": "MyRetrieval",
     "corpus": "corpus.jsonl", "queries": "queries.jsonl", "qrels": "qrels.tsv"}

Paths are relative to the JSON file. STS ``data``: an STS-B file (tab-separated: genre, file,
year, id, score, sentence1, sentence2) or JSON lines with ``sentence1``, ``sentence2``,
``score``. Retrieval: BEIR's files (corpus lines ``{"_id", "title", "text"}``, query lines
``{"_id", "text"}``, qrels a TSV with a header and columns query-id, corpus-id, score).
Optional keys: ``instruction`` (queries' and symmetric texts' instruction), ``main_score``
(default ``cosine_spearman`` / ``ndcg_at_10``), ``languages`` (default ``["eng-Latn"]``),
``split`` (default ``test``).
"""

from __future__ import annotations

import argparse
import csv
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mteb
import numpy as np
from datasets import Dataset, DatasetDict
from mteb.abstasks.retrieval import AbsTaskRetrieval
from mteb.abstasks.sts import AbsTaskSTS
from mteb.abstasks.task_metadata import TaskMetadata
from mteb.models.abs_encoder import AbsEncoder, get_prompt
from mteb.models.model_meta import ModelMeta, ScoringFunction
from mteb.types import PromptType

from .evaluation import read_sts
from .files import read_json_lines, read_json_object

# llm2vec's query instructions by MTEB task name: test_configs/mteb/task_to_instructions.json
# of github.com/McGill-NLP/llm2vec (commit 3c633e86), MIT License, Copyright (c) 2024 McGill NLP.
_DUPLICATE_QUESTION = (
    "Given a question, retrieve detailed question descriptions from Stackexchange that are"
    " duplicates to the given question:"
)
_SIMILAR_TEXT = "Retrieve semantically similar text:"
_CQADUPSTACK = (
    "Android",
    "English",
    "Gaming",
    "Gis",
    "Mathematica",
    "Physics",
    "Programmers",
    "Stats",
    "Tex",
    "Unix",
    "Webmasters",
    "Wordpress",
)
LLM2VEC_TASK_INSTRUCTIONS: dict[str, str] = {
    "ClimateFEVER": (
        "Given a claim about climate change, retrieve documents that support or refute the claim:"
    ),
    "HotpotQA": "Given a multi-hop question, retrieve documents that can help answer the question:",
    "FEVER": "Given a claim, retrieve documents that support or refute the claim:",
    "MSMARCO": "Given a web search query, retrieve relevant passages that answer the query:",
    "DBPedia": "Given a query, retrieve relevant entity descriptions from DBPedia:",
    "NQ": "Given a question, retrieve Wikipedia passages that answer the question:",
    "QuoraRetrieval": (
        "Given a question, retrieve questions that are semantically equivalent to the given"
        " question:"
    ),
    "SCIDOCS": (
        "Given a scientific paper title, retrieve paper abstracts that are cited by the given"
        " paper:"
    ),
    "TRECCOVID": "Given a query on COVID-19, retrieve documents that answer the query:",
    "Touche2020": (
        "Given a question, retrieve detailed and persuasive arguments that answer the question:"
    ),
    "SciFact": "Given a scientific claim, retrieve documents that support or refute the claim:",
    "NFCorpus": "Given a question, retrieve relevant documents that best answer the question:",
    "ArguAna": "Given a claim, find documents that refute the claim:",
    **{f"CQADupstack{forum}Retrieval": _DUPLICATE_QUESTION for forum in _CQADUPSTACK},
    "FiQA2018": "Given a financial question, retrieve user replies that best answer the question:",
    "AskUbuntuDupQuestions": "Retrieve duplicate questions from AskUbuntu forum:",
    "StackOverflowDupQuestions": "Retrieve duplicate questions from StackOverflow forum:",
    "SciDocsRR": (
        "Given a title of a scientific paper, retrieve the titles of other relevant papers:"
    ),
    "MindSmallReranking": "Retrieve relevant news articles based on user browsing history:",
    "Banking77Classification": "Given a online banking query, find the corresponding intents:",
    "EmotionClassification": (
        "Classify the emotion expressed in the given Twitter message into one of the six"
        " emotions: anger, fear, joy, love, sadness, and surprise:"
    ),
    "TweetSentimentExtractionClassification": (
        "Classify the sentiment of a given tweet as either positive, negative, or neutral:"
    ),
    "AmazonCounterfactualClassification": (
        "Classify a given Amazon customer review text as either counterfactual or"
        " notcounterfactual:"
    ),
    "ImdbClassification": (
        "Classify the sentiment expressed in the given movie review text from the IMDB dataset:"
    ),
    "MassiveIntentClassification": "Given a user utterance as query, find the user intents:",
    "MassiveScenarioClassification": "Given a user utterance as query, find the user scenarios:",
    "MTOPDomainClassification": (
        "Classify the intent domain of the given utterance in task-oriented conversation:"
    ),
    "MTOPIntentClassification": (
        "Classify the intent of the given utterance in task-oriented conversation:"
    ),
    "ToxicConversationsClassification": (
        "Classify the given comments as either toxic or not toxic:"
    ),
    "AmazonPolarityClassification": (
        "Classify Amazon reviews into positive or negative sentiment:"
    ),
    "AmazonReviewsClassification": (
        "Classify the given Amazon review into its appropriate rating category:"
    ),
    "TwentyNewsgroupsClustering": "Identify the topic or theme of the given news articles:",
    "BiorxivClusteringS2S": "Identify the main category of Biorxiv papers based on the titles:",
    "MedrxivClusteringS2S": "Identify the main category of Medrxiv papers based on the titles:",
    "ArxivClusteringP2P": (
        "Identify the main and secondary category of Arxiv papers based on the titles and"
        " abstracts:"
    ),
    "ArxivClusteringS2S": (
        "Identify the main and secondary category of Arxiv papers based on the titles:"
    ),
    "BiorxivClusteringP2P": (
        "Identify the main category of Biorxiv papers based on the titles and abstracts:"
    ),
    "MedrxivClusteringP2P": (
        "Identify the main category of Medrxiv papers based on the titles and abstracts:"
    ),
    "RedditClustering": "Identify the topic or theme of Reddit posts based on the titles:",
    "RedditClusteringP2P": (
        "Identify the topic or theme of Reddit posts based on the titles and posts:"
    ),
    "StackExchangeClustering": (
        "Identify the topic or theme of StackExchange posts based on the titles:"
    ),
    "StackExchangeClusteringP2P": (
        "Identify the topic or theme of StackExchange posts based on the given paragraphs:"
    ),
    "TwitterSemEval2015": "Retrieve tweets that are semantically similar to the given tweet:",
    "TwitterURLCorpus": "Retrieve tweets that are semantically similar to the given tweet:",
    "SprintDuplicateQuestions": "Retrieve duplicate questions from Sprint forum:",
    **{
        name: _SIMILAR_TEXT
        for name in (
            "STS12",
            "STS13",
            "STS14",
            "STS15",
            "STS16",
            "STS17",
            "STS22",
            "BIOSSES",
            "SICK-R",
            "STSBenchmark",
        )
    },
    "SummEval": "Given a news summary, retrieve other semantically similar summaries:",
}


class MTEBModel(AbsEncoder):
    """An ``LLM2Vec`` as an mteb encoder (``mteb.evaluate(MTEBModel(encoder), tasks)``).

    ``instructions``: task name -> instruction (default: llm2vec's table). ``prompts``:
    sentence-transformers prompts (keys as mteb reads them: a task name, a task type, ``query``,
    ``document``, or ``NAME-query``...), used first. ``max_batch_tokens``: the token budget of a
    packed batch (default: the encoder's). ``name`` / ``revision``: where mteb files the results
    (``llm2vec-fast/<model folder name>``, ``local``); the encoder settings that change the
    numbers go into the results path as mteb's experiment name.
    """

    def __init__(
        self,
        encoder: Any,
        *,
        instructions: dict[str, str] | None = None,
        prompts: dict[str, str] | None = None,
        max_batch_tokens: int | None = None,
        name: str | None = None,
        revision: str = "local",
    ) -> None:
        self.model = encoder
        self.instructions = dict(
            LLM2VEC_TASK_INSTRUCTIONS if instructions is None else instructions
        )
        self.model_prompts = dict(prompts) if prompts else None
        self.max_batch_tokens = max_batch_tokens
        self.mteb_model_meta = _model_meta(encoder, name, revision)

    def instruction_for(self, task_metadata: TaskMetadata, prompt_type: PromptType | None) -> str:
        """The instruction the texts of this task and prompt type are encoded with."""
        prompt = get_prompt(self.model_prompts, task_metadata, prompt_type)
        if prompt:
            return prompt
        if prompt_type == PromptType.document:
            return ""
        if task_metadata.name in self.instructions:
            return self.instructions[task_metadata.name]
        task_prompt = task_metadata.prompt
        if isinstance(task_prompt, dict):
            task_prompt = task_prompt.get((prompt_type or PromptType.query).value)
        if not task_prompt:
            return ""
        # llm2vec's instructions end in a colon (mteb's llm2vec wrapper makes them so)
        return task_prompt if task_prompt.endswith(":") else task_prompt.strip(".") + ":"

    def encode(
        self,
        inputs: Any,
        *,
        task_metadata: TaskMetadata,
        hf_split: str,
        hf_subset: str,
        prompt_type: PromptType | None = None,
        **kwargs: Any,
    ) -> np.ndarray:
        """``(n, hidden)`` fp32 embeddings of every text of mteb's DataLoader, in its order."""
        texts = [text for batch in inputs for text in batch["text"]]
        instruction = self.instruction_for(task_metadata, prompt_type)
        distinct = list(dict.fromkeys(texts))
        embeddings = self.model.encode(
            [[instruction, text] for text in distinct],
            show_progress_bar=bool(kwargs.get("show_progress_bar", True)),
            convert_to_numpy=True,
            max_batch_tokens=self.max_batch_tokens,
        )  # (distinct, hidden)
        row = {text: index for index, text in enumerate(distinct)}
        return np.asarray(embeddings)[[row[text] for text in texts]]


def _model_meta(encoder: Any, name: str | None, revision: str) -> ModelMeta:
    """Metadata mteb stores beside the scores; the settings that change the numbers are its
    experiment name, so that two configurations never share a results folder."""
    loaded = getattr(encoder.model, "loaded_from", None)
    source = "model" if loaded is None else str(loaded.source)
    settings: dict[str, Any] = {
        "pooling_mode": encoder.pooling_mode,
        "causal": encoder.causal,
        "max_length": encoder.max_length,
    }
    if loaded is not None and loaded.adapters:
        settings["adapters"] = [Path(adapter).name for adapter in loaded.adapters]
    return ModelMeta(
        loader=None,
        name=name or f"llm2vec-fast/{Path(source).name}",
        revision=revision,
        release_date=None,
        languages=None,
        n_parameters=sum(parameter.numel() for parameter in encoder.model.parameters()),
        memory_usage_mb=None,
        max_tokens=encoder.max_length,
        embed_dim=encoder.embedding_dim,
        license=None,
        open_weights=True,
        public_training_code=None,
        public_training_data=None,
        framework=["PyTorch", "LLM2Vec"],
        similarity_fn_name=ScoringFunction.COSINE,
        use_instructions=True,
        training_datasets=None,
        experiment_kwargs=settings,
    )


# --------------------------------------------------------------------------------------------
# Local tasks
# --------------------------------------------------------------------------------------------

LOCAL_TASK_TYPES = ("STS", "Retrieval")
_MAIN_SCORES = {"STS": "cosine_spearman", "Retrieval": "ndcg_at_10"}


def load_local_task(path: str | Path) -> AbsTaskSTS | AbsTaskRetrieval:
    """The mteb task a local JSON definition describes (see the module docstring)."""
    path = Path(path)
    definition = read_json_object(path)
    task_type = definition.get("type")
    if task_type not in LOCAL_TASK_TYPES:
        raise ValueError(
            f"{path}: type must be one of {', '.join(LOCAL_TASK_TYPES)}, got {task_type!r}"
        )
    name = definition.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{path}: name must be a non-empty string")
    split = definition.get("split", "test")
    metadata = TaskMetadata(
        name=name,
        type=task_type,
        description=f"Local {task_type} task defined in {path.name}",
        reference=None,
        dataset={"path": str(path.resolve()), "revision": "local"},
        category="t2t",
        modalities=["text"],
        eval_splits=[split],
        eval_langs=definition.get("languages", ["eng-Latn"]),
        main_score=definition.get("main_score", _MAIN_SCORES[task_type]),
        date=None,
        domains=None,
        task_subtypes=None,
        license=None,
        annotations_creators=None,
        dialect=None,
        sample_creation=None,
        bibtex_citation=None,
        prompt=definition.get("instruction"),
    )
    folder = path.parent
    if task_type == "STS":
        data = _sts_pairs(folder / _file_entry(path, definition, "data"))
        scores = data["score"]
        attributes = {"min_score": min(scores), "max_score": max(scores)}
        base = _LocalSTSTask
        dataset = DatasetDict({split: Dataset.from_dict(data)})
    else:
        dataset = {
            "default": {
                split: {
                    "corpus": _beir_corpus(folder / _file_entry(path, definition, "corpus")),
                    "queries": _beir_queries(folder / _file_entry(path, definition, "queries")),
                    "relevant_docs": _beir_qrels(folder / _file_entry(path, definition, "qrels")),
                    "top_ranked": None,
                }
            }
        }
        attributes = {}
        base = _LocalRetrievalTask
    task_class = type(re.sub(r"\W", "_", name), (base,), {"metadata": metadata, **attributes})
    task = task_class()
    task.local_dataset = dataset
    return task


class _LocalSTSTask(AbsTaskSTS):
    local_dataset: Any

    def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
        self.dataset = self.local_dataset
        self.data_loaded = True


class _LocalRetrievalTask(AbsTaskRetrieval):
    local_dataset: Any

    def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
        self.dataset = self.local_dataset
        self.data_loaded = True


def _file_entry(path: Path, definition: dict, key: str) -> str:
    value = definition.get(key)
    if not isinstance(value, str) or not value:
        raise ValueError(f"{path}: {key} must name a data file")
    return value


def _json_lines(path: Path) -> list[dict]:
    """The JSON objects of a JSON-lines file; a bad line raises with its number."""
    rows = []
    for number, row in read_json_lines(path):
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{number}: expected a JSON object")
        rows.append(row)
    return rows


def _field(path: Path, row: dict, keys: tuple[str, ...]) -> Any:
    for key in keys:
        if key in row:
            return row[key]
    raise ValueError(f"{path}: a line has no {' or '.join(keys)}: {row}")


def _sts_pairs(path: Path) -> dict[str, list]:
    """sentence1, sentence2 and score columns from an STS-B file or JSON lines."""
    if path.suffix == ".jsonl":
        rows = _json_lines(path)
        return {
            "sentence1": [str(_field(path, row, ("sentence1",))) for row in rows],
            "sentence2": [str(_field(path, row, ("sentence2",))) for row in rows],
            "score": [float(_field(path, row, ("score",))) for row in rows],
        }
    data = read_sts(path)
    return {
        "sentence1": data.sentences1,
        "sentence2": data.sentences2,
        "score": data.scores.tolist(),
    }


def _beir_corpus(path: Path) -> Dataset:
    rows = _json_lines(path)
    return Dataset.from_dict(
        {
            "id": [str(_field(path, row, ("_id", "id"))) for row in rows],
            "title": [str(row.get("title", "")) for row in rows],
            "text": [str(_field(path, row, ("text",))) for row in rows],
        }
    )


def _beir_queries(path: Path) -> Dataset:
    rows = _json_lines(path)
    return Dataset.from_dict(
        {
            "id": [str(_field(path, row, ("_id", "id"))) for row in rows],
            "text": [str(_field(path, row, ("text",))) for row in rows],
        }
    )


def _beir_qrels(path: Path) -> dict[str, dict[str, int]]:
    """query id -> {document id: relevance} from a TSV with a header row."""
    relevant: dict[str, dict[str, int]] = {}
    with open(path, encoding="utf-8", newline="") as handle:
        rows = csv.reader(handle, delimiter="\t")
        next(rows, None)
        for number, row in enumerate(rows, start=2):
            if not row:
                continue
            if len(row) < 3:
                raise ValueError(f"{path}:{number}: expected query-id, corpus-id, score")
            try:
                relevant.setdefault(row[0], {})[row[1]] = int(row[2])
            except ValueError:
                raise ValueError(f"{path}:{number}: score {row[2]!r} is not an int") from None
    return relevant


# --------------------------------------------------------------------------------------------
# llm2vec-fast eval mteb
# --------------------------------------------------------------------------------------------


def resolve_tasks(spec: str) -> list:
    """mteb tasks from ``--tasks``: comma-separated task names, benchmark names such as
    ``MTEB(eng, v2)`` (their commas are inside parentheses) and local ``.json`` definitions."""
    tasks = []
    for item in _split_task_list(spec):
        if item.endswith(".json"):
            tasks.append(load_local_task(item))
        elif "(" in item:
            try:
                tasks.extend(mteb.get_benchmark(item).tasks)
            except KeyError as error:
                raise ValueError(f"--tasks: {error.args[0]}") from None
        else:
            try:
                tasks.append(mteb.get_task(item))
            except KeyError as error:
                raise ValueError(f"--tasks: {error.args[0]}") from None
    if not tasks:
        raise ValueError("--tasks names no task")
    return tasks


def _split_task_list(spec: str) -> list[str]:
    """Split at the commas that are not inside parentheses."""
    items, depth, current = [], 0, []
    for char in spec:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            items.append("".join(current).strip())
            current = []
        else:
            current.append(char)
    items.append("".join(current).strip())
    return [item for item in items if item]


def folder_prompts(model: str | Path) -> dict[str, str] | None:
    """The ``prompts`` of a sentence-transformers folder (config_sentence_transformers.json)."""
    config = Path(model) / "config_sentence_transformers.json"
    if not config.is_file():
        return None
    prompts = read_json_object(config).get("prompts")
    return {str(key): str(value) for key, value in prompts.items() if value} if prompts else None


def run_eval_mteb(args: argparse.Namespace, load_encoder: Callable[[], Any]) -> int:
    """``llm2vec-fast eval mteb``: mteb.evaluate over ``--tasks`` (resolved before the model
    loads, so a wrong name fails fast), results under ``--output``."""
    tasks = resolve_tasks(args.tasks)
    encoder = load_encoder()
    model = MTEBModel(encoder, prompts=folder_prompts(args.model))
    results = mteb.evaluate(
        model,
        tasks,
        cache=mteb.ResultCache(cache_path=args.output),
        overwrite_strategy="always" if args.overwrite else "only-missing",
        show_progress_bar=True,
    )
    for task_result in results.task_results:
        line = {"task": task_result.task_name, "main_score": task_result.get_score()}
        print(json.dumps(line))
    return 0
