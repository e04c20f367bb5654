"""SEFE's maths on values computed by hand: key elements (top entries of |scaling B A|), their
union over tasks, the penalty and where its gradient goes, the stage adapter (one PEFT
adapter + the positions file), answer-style diversification, and the options' checks."""

from __future__ import annotations

import dataclasses
import random
import re
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from mllmcl.data.prompts import LETTER_INSTRUCTION, MED_INSTRUCTION, YES_NO_INSTRUCTION
from mllmcl.data.types import Sample
from mllmcl.methods import sefe
from mllmcl.methods.olora import NEW, OLD


class Toy(nn.Module):
    """Named like a VLM's language model so that the LoRA target regex applies: two 4 -> 3 linears."""

    def __init__(self):
        super().__init__()
        self.language_model = nn.Module()
        self.language_model.q_proj = nn.Linear(4, 3, bias=False)
        self.language_model.v_proj = nn.Linear(4, 3, bias=False)

    def forward(self, x):
        return self.language_model.q_proj(x) + self.language_model.v_proj(x)


SETTINGS = dict(rank=2, alpha=4, dropout=0.0, target_modules=("q_proj", "v_proj"))  # scaling 2


def _peft(adapters=(NEW,)):
    from peft import get_peft_model

    from mllmcl.models.lora import LoraSettings, peft_config

    torch.manual_seed(0)
    config = peft_config(LoraSettings(**SETTINGS))
    model = get_peft_model(Toy(), config, adapter_name=adapters[0])
    for name in adapters[1:]:
        model.add_adapter(name, config)
    model.base_model.set_adapter(list(adapters))
    return model


def _set(layer, adapter, b, a):
    with torch.no_grad():
        layer.lora_B[adapter].weight.copy_(torch.tensor(b, dtype=torch.float32))
        layer.lora_A[adapter].weight.copy_(torch.tensor(a, dtype=torch.float32))


def _layers(model):
    lm = model.base_model.model.language_model
    return lm.q_proj, lm.v_proj


# --------------------------------------------------------------------------- key elements

def test_top_positions_on_a_hand_written_matrix():
    delta = torch.tensor([[0.1, -5.0, 0.2, 3.0],
                          [0.0, 0.3, -4.0, 0.05],
                          [1.0, 0.0, 0.0, -0.4]])
    assert sefe.top_positions(delta, 0.25).tolist() == [1, 3, 6]  # |-5|, |3|, |-4|: 3 of 12, sorted
    assert sefe.top_positions(delta, 0.34).tolist() == [1, 3, 6, 8]  # round(4.08) = 4: then |1| at (2, 0)
    assert sefe.top_positions(delta, 0.01).tolist() == [1]  # at least one
    assert sefe.top_positions(delta, 1.0).tolist() == list(range(12))
    ties = torch.tensor([[2.0, -2.0], [2.0, 1.0]])
    assert sefe.top_positions(ties, 0.5).tolist() == [0, 1]  # ties go to the lower index


def test_key_positions_come_from_the_new_lora_alone():
    model = _peft((OLD, NEW))
    q, v = _layers(model)
    _set(q, OLD, [[9, 9], [9, 9], [9, 9]], [[9, 9, 9, 9], [9, 9, 9, 9]])  # huge, but not the new task's
    _set(q, NEW, [[1, 0], [0, 2], [1, 1]], [[1, 2, 0, -1], [0, 1, 3, 0]])  # B A = [[1,2,0,-1],[0,2,6,0],[1,3,3,-1]]
    _set(v, NEW, [[0, 0], [0, 0], [1, 0]], [[0, 0, 0, -7], [0, 0, 0, 0]])
    pos = sefe.key_positions(model, 2 / 12)
    assert set(pos) == {"language_model.q_proj", "language_model.v_proj"}
    assert pos["language_model.q_proj"].tolist() == [6, 9]  # 6 (row 1, col 2), then 3 at (2, 1) before (2, 2)
    assert pos["language_model.v_proj"].tolist() == [0, 11]  # the only non-zero entry, and the tie at 0: index 0
    assert pos["language_model.q_proj"].dtype == torch.int64


def test_union_over_tasks():
    old = {"a": torch.tensor([1, 6]), "b": torch.tensor([0])}
    new = {"a": torch.tensor([3, 6, 11]), "b": torch.tensor([0, 2])}
    union = sefe.union_positions(old, new)
    assert union["a"].tolist() == [1, 3, 6, 11] and union["b"].tolist() == [0, 2]
    with pytest.raises(ValueError, match="target_modules"):
        sefe.union_positions(old, {"a": torch.tensor([1])})


# --------------------------------------------------------------------------- the penalty

def test_penalty_value_on_hand_computed_factors():
    model = _peft()
    q, v = _layers(model)
    _set(q, NEW, [[1, 0], [0, 2], [1, 1]], [[1, 2, 0, -1], [0, 1, 3, 0]])  # B A = [[1,2,0,-1],[0,2,6,0],[1,3,3,-1]]
    _set(v, NEW, [[0.5, 0.5]] * 3, [[1, 0, 0, 0], [0, 0, 0, -1]])  # B A rows: [0.5, 0, 0, -0.5]
    positions = {"language_model.q_proj": torch.tensor([1, 6, 11]),  # 2, 6, -1 -> x2 scaling: 4, 12, 2 -> mean 6
                 "language_model.v_proj": torch.tensor([3, 4])}  # -0.5, 0.5 -> 1, 1 -> mean 1
    assert sefe.values_at(q, positions["language_model.q_proj"]).tolist() == [4.0, 12.0, -2.0]
    assert float(sefe.sefe_penalty(model, positions).detach()) == pytest.approx((6 + 1) / 2)
    # many positions: the product is formed and indexed; the same values
    every = torch.arange(12)
    torch.testing.assert_close(sefe.values_at(q, every), 2 * torch.tensor([1., 2, 0, -1, 0, 2, 6, 0, 1, 3, 3, -1]))
    assert float(sefe.sefe_penalty(model, {"language_model.q_proj": every}).detach()) == pytest.approx(2 * 20 / 12)


def test_penalty_gradient_reaches_only_the_new_lora():
    model = _peft((OLD, NEW))
    for name, p in model.named_parameters():
        p.requires_grad_(f".{NEW}." in name)
    q, _ = _layers(model)
    with torch.no_grad():
        for adapter in (OLD, NEW):
            q.lora_B[adapter].weight.normal_()
    positions = {"language_model.q_proj": torch.tensor([0, 5, 10]), "language_model.v_proj": torch.tensor([2])}
    sefe.sefe_penalty(model, positions).backward()
    assert q.lora_A[NEW].weight.grad.abs().sum() > 0 and q.lora_B[NEW].weight.grad.abs().sum() > 0
    assert q.lora_A[OLD].weight.grad is None and q.lora_B[OLD].weight.grad is None
    assert q.base_layer.weight.grad is None
    # only the rows of B and the columns of A that meet a position get a gradient
    assert q.lora_B[NEW].weight.grad.abs().sum(dim=1).nonzero().flatten().tolist() == [0, 1, 2]
    assert q.lora_A[NEW].weight.grad.abs().sum(dim=0).nonzero().flatten().tolist() == [0, 1, 2]
    q.lora_A[NEW].weight.grad = None
    sefe.sefe_penalty(model, {"language_model.q_proj": torch.tensor([5])}).backward()  # (row 1, col 1) only
    assert q.lora_A[NEW].weight.grad.abs().sum(dim=0).nonzero().flatten().tolist() == [1]


# --------------------------------------------------------------------------- the adapter kind, stage after stage

def _kind(previous=None, lam=2.5e3, top=0.25):
    from mllmcl.models.lora import LoraSettings

    return sefe.SEFEKind(SimpleNamespace(adapter_args={"lambda": lam, "top_fraction": top, "previous": previous},
                                         lora=LoraSettings(**SETTINGS)))


def test_stage_adapters_are_one_peft_adapter_with_the_union_of_positions(tmp_path):
    from peft import PeftModel

    from mllmcl.models.adapters import local_adapter

    torch.manual_seed(3)
    base = Toy()
    first = _kind()
    m0 = first.build(base)
    with torch.no_grad():
        for layer in _layers(m0):
            layer.lora_B[NEW].weight.normal_()
    assert first.extra_loss(m0) is None  # task 0: nothing to protect
    stage0 = str(tmp_path / "0")
    first.save(m0, stage0, {"stage": 0})
    pos0, shapes = sefe.load_positions(stage0)
    assert shapes == {"language_model.q_proj": (3, 4), "language_model.v_proj": (3, 4)}
    assert all(p.numel() == 3 for p in pos0.values())  # 25% of 12

    second = _kind(stage0)
    m1 = second.build(_fresh_like(base))
    q, v = _layers(m1)
    assert {n for n, p in m1.named_parameters() if p.requires_grad} == {
        f"base_model.model.language_model.{l}.lora_{f}.{NEW}.weight" for l in ("q_proj", "v_proj") for f in "AB"}
    assert isinstance(q.lora_dropout[OLD], nn.Identity)
    with torch.no_grad():
        for layer in (q, v):
            layer.lora_B[NEW].weight.normal_()
    reg = second.extra_loss(m1)
    assert float(reg.detach()) == pytest.approx(2.5e3 * float(sefe.sefe_penalty(m1, pos0).detach()))
    x = torch.randn(5, 4)
    m1.eval()
    expected = m1(x)
    stage1 = str(tmp_path / "1")
    second.save(m1, stage1, {"stage": 1})
    pos1, _ = sefe.load_positions(stage1)
    fresh_pos = sefe.key_positions(m1, 0.25)
    for name in pos1:  # the union of task 0's and task 1's own
        assert set(pos1[name].tolist()) == set(pos0[name].tolist()) | set(fresh_pos[name].tolist())
    with local_adapter(stage1) as local:  # the PEFT loading path of the engine: the extra file is ignored
        served = PeftModel.from_pretrained(_fresh_like(base), local)
    assert served.peft_config["default"].r == 4
    torch.testing.assert_close(served(x), expected)


def _fresh_like(base: Toy) -> Toy:
    fresh = Toy()
    fresh.load_state_dict({k.replace("base_layer.", ""): v for k, v in base.state_dict().items() if "lora_" not in k})
    return fresh


def test_positions_file_is_byte_identical_for_the_same_positions(tmp_path):
    positions = {"b": torch.tensor([2, 5]), "a": torch.tensor([0])}
    shapes = {"a": (2, 3), "b": (3, 2)}
    files = []
    for i in range(6):
        (tmp_path / str(i)).mkdir()
        sefe.save_positions(dict(reversed(positions.items())) if i % 2 else positions, shapes, str(tmp_path / str(i)),
                            {"top_fraction": 0.02, "tasks": 2})
        files.append((tmp_path / str(i) / sefe.POSITIONS_FILE).read_bytes())
    assert len(set(files)) == 1
    loaded, loaded_shapes = sefe.load_positions(str(tmp_path / "0"))
    assert {k: v.tolist() for k, v in loaded.items()} == {"a": [0], "b": [2, 5]} and loaded_shapes == shapes


def test_a_folder_without_positions_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="sefe_positions"):
        sefe.load_positions(str(tmp_path))


# --------------------------------------------------------------------------- answer-style diversification

def _sample(i, question, answer, task="T"):
    return Sample(uid=f"{task}_{i}", task=task, split="train", image=f"/img/{i}.png", image_rel=f"images/{i}.png",
                  question=question, answer=answer, meta={"k": i})


def _pool(n=20):
    words = ["cat", "dog", "bird"]
    return [_sample(i, f"What animal is shown? ({i})", words[i % 3]) if i % 2 else
            _sample(i, f"Is there an animal? ({i})", "yes" if i % 4 else "no") for i in range(n)]


class FirstRng:
    """A stand-in for random.Random that always takes the first choice (and asks the true answer)."""

    def __init__(self, r=0.0):
        self.r = r

    def random(self):
        return self.r

    def choice(self, seq):
        return seq[0]

    def sample(self, seq, n):
        return list(seq)[:n]

    def shuffle(self, seq):
        pass


def test_asd_rewrites_the_fraction_and_nothing_else():
    samples = _pool(20)
    out, styles = sefe.diversify(samples, 0.2, seed=0, stage=1)
    changed = [i for i, (a, b) in enumerate(zip(samples, out)) if a != b]
    assert len(changed) == 4 == sum(styles.values())
    assert all(out[i].meta["sefe_asd"] in sefe.STYLES for i in changed)
    assert all(out[i] is samples[i] for i in range(20) if i not in changed)
    for i in changed:  # the same record: image, ids, split, the rest of meta
        a, b = samples[i], out[i]
        assert (a.uid, a.image, a.image_rel, a.split, a.task, b.meta["k"]) == (b.uid, b.image, b.image_rel, b.split,
                                                                               b.task, i)
    assert sefe.diversify(samples, 0.0, 0, 1) == (samples, {})
    assert sum(sefe.diversify(samples, 1.0, 0, 1)[1].values()) == 20


def test_asd_is_deterministic_under_the_seed_and_stage():
    samples = _pool(30)
    assert sefe.diversify(samples, 0.3, 7, 2) == sefe.diversify(list(samples), 0.3, 7, 2)
    others = [sefe.diversify(samples, 0.3, seed, stage)[0] for seed, stage in ((8, 2), (7, 3))]
    assert all(o != sefe.diversify(samples, 0.3, 7, 2)[0] for o in others)


def test_asd_vocabulary_is_the_given_samples_answers():
    samples = _pool(40)
    vocab = {s.target for s in samples}
    out, styles = sefe.diversify(samples, 1.0, 1, 0)
    assert styles.get(sefe.YES_NO) and styles.get(sefe.CHOICE)
    for orig, s in zip(samples, out):
        new_text = s.question[len(orig.question):]
        asked = re.findall(r"Is the answer (.*)\?", new_text)
        options = sefe.listed_options(new_text)
        assert set(asked) <= vocab and set(options.values()) <= vocab
        if s.meta["sefe_asd"] == sefe.CHOICE:
            assert orig.target in options.values() and options[s.target] == orig.target
            assert 2 <= len(options) <= 4
            # a distractor has the true answer's kind: yes/no among yes/no, words among words
            assert {sefe.answer_kind(o) for o in options.values()} == {sefe.answer_kind(orig.target)}
    assert sefe.answer_vocabulary(samples) == {"text": ("bird", "cat", "dog"), "yes_no": ("no", "yes")}


def test_every_style_on_a_hand_made_sample():
    word = _sample(0, "What colour is the stain?\n" + MED_INSTRUCTION, "pink", task="Med")
    vocab = {"text": ("brown", "pink", "purple"), "yes_no": ("no", "yes")}
    yes = sefe.rewrite(word, sefe.YES_NO, vocab, FirstRng(0.0))  # asks the true answer
    assert yes.question == f"What colour is the stain?\nIs the answer pink?\n{YES_NO_INSTRUCTION}"
    assert yes.answer == "yes" and yes.meta["sefe_asd"] == sefe.YES_NO
    no = sefe.rewrite(word, sefe.YES_NO, vocab, FirstRng(0.9))  # asks the first wrong one
    assert no.question.endswith(f"Is the answer brown?\n{YES_NO_INSTRUCTION}") and no.answer == "no"
    mc = sefe.rewrite(word, sefe.CHOICE, vocab, FirstRng())  # 3 options: the truth first (no shuffle)
    assert mc.question == f"What colour is the stain?\nA. pink\nB. brown\nC. purple\n{LETTER_INSTRUCTION}"
    assert mc.answer == "A"
    ex = sefe.rewrite(word, sefe.EXPLANATION, vocab, FirstRng())
    assert ex.question == f"What colour is the stain?\n{sefe.EXPLANATION_INSTRUCTION}"
    assert ex.answer == "pink. The answer is pink."
    assert sefe.styles_for(word, vocab) == [sefe.YES_NO, sefe.CHOICE, sefe.EXPLANATION]  # short: its own

    letter = _sample(1, "Which part is marked?\nA. top\nB. right\nC. bottom\n" + LETTER_INSTRUCTION, "B")
    letters = {"letter": ("A", "B", "C")}
    assert sefe.styles_for(letter, letters) == [sefe.YES_NO, sefe.EXPLANATION, sefe.SHORT]  # not re-lettered
    short = sefe.rewrite(letter, sefe.SHORT, letters, FirstRng())
    assert short.question == f"Which part is marked?\nA. top\nB. right\nC. bottom\n{sefe.OPTION_TEXT_INSTRUCTION}"
    assert short.answer == "right"
    assert sefe.rewrite(letter, sefe.EXPLANATION, letters, FirstRng()).answer == "B. The answer is B: right."
    assert sefe.rewrite(letter, sefe.YES_NO, letters, FirstRng(0.9)).question.endswith("Is the answer A?\n"
                                                                                        + YES_NO_INSTRUCTION)
    paren = _sample(2, "How many circles?\n(A) 1\n(B) 2\n(C) 3", "(C)")
    assert sefe.rewrite(paren, sefe.SHORT, {"letter": ("(A)", "(C)")}, FirstRng()).answer == "3"

    yn = _sample(3, "Is there water?", "no")
    assert sefe.styles_for(yn, {"yes_no": ("no", "yes")}) == [sefe.CHOICE, sefe.EXPLANATION]
    two = sefe.rewrite(yn, sefe.CHOICE, {"yes_no": ("no", "yes")}, FirstRng())
    assert two.question == f"Is there water?\nA. no\nB. yes\n{LETTER_INSTRUCTION}" and two.answer == "A"
    # a kind with one distinct answer: no yes/no or multiple choice; a question with no options: no option text
    assert sefe.styles_for(word, {"text": ("pink",)}) == [sefe.EXPLANATION]
    assert sefe.styles_for(_sample(4, "Which one?", "B"), {"letter": ("A", "B")}) == [sefe.YES_NO, sefe.EXPLANATION]


def test_rewritten_questions_keep_the_image_placeholder_as_the_original():
    from mllmcl.data.release import IMAGE_TOKEN

    vocab = {"text": ("a", "b")}
    plain = sefe.rewrite(_sample(0, "Q?", "a"), sefe.CHOICE, vocab, random.Random(0))
    assert IMAGE_TOKEN not in plain.question and plain.question.startswith("Q?\n")  # the chat format adds it
    tagged = sefe.rewrite(_sample(1, f"{IMAGE_TOKEN}\nQ?", "a"), sefe.YES_NO, vocab, random.Random(0))
    assert tagged.question.startswith(f"{IMAGE_TOKEN}\nQ?\n") and tagged.question.count(IMAGE_TOKEN) == 1


def test_the_method_rewrites_training_samples_only(tmp_path):
    from mllmcl.config import load_config
    from mllmcl.data.types import Stream, Task, TaskSpec
    from mllmcl.methods.base import Stage
    from mllmcl.storage.layout import RunLayout

    spec = TaskSpec("T", "dcl", "T", "exact", 8, "t")
    train, test = _pool(10), [dataclasses.replace(s, split="test") for s in _pool(10)]
    stream = Stream("s", "", [Task(spec, 0, "", train, test)])
    cfg = load_config(None, ["method.name=sefe", "method.sefe_asd_fraction=0.5", f"storage.root={tmp_path}"])
    (req,) = sefe.SEFE(cfg, stream).plan(Stage(0, stream, RunLayout(str(tmp_path), "r"), cfg))
    assert sum(s != t for s, t in zip(req.samples, train)) == 5 and sum(req.meta["sefe_asd_styles"].values()) == 5
    assert req.adapter_kind is sefe.SEFEKind and req.adapter_args["previous"] is None
    assert stream.tasks[0].test == test  # never rewritten


# --------------------------------------------------------------------------- options

@pytest.mark.parametrize("key,value,message", [
    ("sefe_lambda", -1.0, "method.sefe_lambda=-1.0: must be a finite number >= 0"),
    ("sefe_lambda", float("nan"), "method.sefe_lambda=nan: must be a finite number >= 0"),
    ("sefe_top_fraction", 0.0, "method.sefe_top_fraction=0.0: must be in (0, 1]"),
    ("sefe_top_fraction", 1.5, "method.sefe_top_fraction=1.5: must be in (0, 1]"),
    ("sefe_asd_fraction", -0.1, "method.sefe_asd_fraction=-0.1: must be in [0, 1]"),
    ("sefe_asd_fraction", 1.1, "method.sefe_asd_fraction=1.1: must be in [0, 1]"),
])
def test_options_report_bad_values(key, value, message):
    assert sefe.SEFEOptions(name="sefe", **{key: value}).check() == [message]


def test_options_defaults_and_config():
    from mllmcl.config import load_config
    from mllmcl.errors import ConfigError

    o = sefe.SEFEOptions(name="sefe")
    assert (o.sefe_lambda, o.sefe_top_fraction, o.sefe_asd_fraction) == (2.5e3, 0.02, 0.2) and o.check() == []
    assert sefe.SEFEOptions(name="sefe", sefe_top_fraction=1.0, sefe_asd_fraction=0.0, sefe_lambda=0.0).check() == []
    with pytest.raises(ConfigError, match="train_projector: not supported by sefe"):
        load_config(None, ["lora.train_projector=true", "method.name=sefe"])
    with pytest.raises(ConfigError, match=re.escape("method.sefe_top_fraction=2.0")):
        load_config(None, ["method.name=sefe", "method.sefe_top_fraction=2.0"])
