"""Hugging Face Trainer: the optimizer factory, save at step k and resume to an identical end."""

from __future__ import annotations

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from coap_torch import CoapAdafactor, CoapAdamW
from coap_torch.integrations.hf import coap_optimizer_cls_and_kwargs, target_parameter_names


class TinyModel(nn.Module):
    """A conv, two linear layers of both orientations, a norm: returns ``{"loss", "logits"}`` as HF models do."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 16, 3, padding=1)
        self.up_proj = nn.Linear(16 * 4, 96)
        self.down_proj = nn.Linear(96, 32)
        self.norm = nn.LayerNorm(32)
        self.lm_head = nn.Linear(32, 5)

    def forward(self, x, labels=None):
        h = nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(x)), 2).flatten(1)  # (B, 64)
        h = torch.relu(self.up_proj(h))
        logits = self.lm_head(self.norm(self.down_proj(h)))
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return {"loss": loss, "logits": logits}


class Data(torch.utils.data.Dataset):
    def __init__(self, n: int = 240) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 4, 6, 6, generator=g)
        self.y = torch.randint(0, 5, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


def make_model() -> TinyModel:
    torch.manual_seed(0)
    return TinyModel()


def test_target_modules_follow_optim_target_modules_semantics():
    model = make_model()
    assert target_parameter_names(model, "all-linear") == ["up_proj.weight", "down_proj.weight", "lm_head.weight"]
    assert target_parameter_names(model, ["proj"]) == ["up_proj.weight", "down_proj.weight"]  # substrings
    assert target_parameter_names(model, r".*_proj") == ["up_proj.weight", "down_proj.weight"]  # a regex
    assert target_parameter_names(model, ["conv", "all-linear"])[0] == "conv.weight"  # conv layers too
    with pytest.raises(ValueError, match="matches target_modules=\\['nothing'\\]"):
        target_parameter_names(model, ["nothing"])


class StopAt(transformers.TrainerCallback):
    """Interrupt training after ``step`` (the schedule still runs towards ``max_steps``)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True
        return control


def _args(tmp_path, max_steps: int, **overrides):
    return transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=max_steps,
        per_device_train_batch_size=48,
        learning_rate=3e-3,
        lr_scheduler_type="linear",
        save_strategy="steps",
        save_steps=4,
        logging_steps=100,
        report_to=[],
        use_cpu=True,
        seed=0,
        data_seed=0,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
        **overrides,
    )


OPTIMIZERS = {
    "CoapAdamW": coap_optimizer_cls_and_kwargs(
        ["proj", "conv"],
        CoapAdamW,
        lr=3e-3,
        rank_ratio_matrix=2,
        rank_ratio_cnn=2,
        update_interval=3,
        reproject_factor=2,
        min_conv_numel=0,
    ),
    "CoapAdafactor": coap_optimizer_cls_and_kwargs(
        "all-linear",
        CoapAdafactor,
        lr=3e-3,
        relative_step=False,
        beta1=0.9,
        rank_ratio_matrix=2,
        update_interval=3,
        reproject_factor=2,
    ),
}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_trainer_resume_from_checkpoint_equals_uninterrupted_run(tmp_path, name):
    factory = OPTIMIZERS[name]
    full = make_model()
    trainer = transformers.Trainer(
        full, _args(tmp_path / "full", 8), train_dataset=Data(), optimizer_cls_and_kwargs=factory
    )
    trainer.train()
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # Accelerate's wrapper
    assert isinstance(optimizer, factory[1]["optimizer_cls"])
    projected = [s for s in optimizer.state.values() if "proj" in s or "proj_out" in s]
    assert projected and all(int(s["step"]) == 8 for s in projected)

    first = make_model()
    interrupted = transformers.Trainer(
        first,
        _args(tmp_path / "split", 8),
        train_dataset=Data(),
        optimizer_cls_and_kwargs=factory,
        callbacks=[StopAt(4)],
    )
    interrupted.train()
    assert (tmp_path / "split" / "checkpoint-4").is_dir() and not (tmp_path / "split" / "checkpoint-8").exists()
    resumed = make_model()
    resumer = transformers.Trainer(
        resumed, _args(tmp_path / "split", 8), train_dataset=Data(), optimizer_cls_and_kwargs=factory
    )
    resumer.train(resume_from_checkpoint=str(tmp_path / "split" / "checkpoint-4"))
    for (key, p), q in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(p, q), key


def test_trainer_with_a_ready_optimizer(tmp_path):
    model = make_model()
    opt = CoapAdamW(model.parameters(), lr=3e-3, rank_ratio_matrix=2)
    trainer = transformers.Trainer(model, _args(tmp_path, 2), train_dataset=Data(), optimizers=(opt, None))
    trainer.train()
    assert int(opt.state[model.up_proj.weight]["step"]) == 2 and "proj" in opt.state[model.up_proj.weight]
