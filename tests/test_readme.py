"""README's "hlora for PEFT users": every python block of the section runs, in order, on a tiny Llama,
and does what its comments say."""

import pathlib
import re

import pytest
import torch

import hlora

pytestmark = pytest.mark.usefixtures("one_thread")

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
SECTION = "hlora for PEFT users"


def _section(text: str, title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"README.md has no '## {title}' section"
    return match.group(1)


def _python_blocks(section: str) -> list:
    return re.findall(r"^```python\n(.*?)^```", section, re.M | re.S)


class _Rows(torch.utils.data.Dataset):
    def __init__(self, n=8, seq=6):
        self.ids = torch.randint(1, 97, (n, seq), generator=torch.Generator().manual_seed(4))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def test_the_table_maps_every_peft_call_the_section_promises():
    section = _section(README.read_text(), SECTION)
    table = [line for line in section.splitlines() if line.startswith("| `")]
    for peft_call in ("get_peft_model", "add_adapter", "delete_adapter", "set_adapter", "adapter_names",
                      "disable_adapter", "save_pretrained", "load_adapter", "merge_and_unload", "Trainer"):
        assert any(peft_call in row.split("|")[1] for row in table), f"no table row for PEFT's {peft_call}"


def test_every_snippet_of_the_peft_section_runs_and_does_what_it_says(tiny_model, tmp_path, monkeypatch):
    blocks = _python_blocks(_section(README.read_text(), SECTION))
    assert len(blocks) == 5
    monkeypatch.chdir(tmp_path)
    ns = {"model": tiny_model("llama"), "load_base_model": lambda: tiny_model("llama"),
          "input_ids": torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(2)),
          "train_dataset": _Rows()}
    model = ns["model"]
    for i, block in enumerate(blocks):
        exec(compile(block, f"README.md[{SECTION}] block {i + 1}", "exec"), ns)

    # routing: the mixed batch's sample 1 took the base model only
    torch.testing.assert_close(ns["mixed"][1], ns["base_logits"][1])
    # training ran and wrote plugin-only checkpoints; save_model an hlora checkpoint
    assert ns["trainer"].state.global_step == 2
    assert (tmp_path / "out" / "checkpoint-2" / "hlora_model.safetensors").is_file()
    assert not (tmp_path / "out" / "checkpoint-2" / "model.safetensors").exists()
    assert hlora.get_config(hlora.load(tiny_model("llama"), tmp_path / "out" / "final")).plugin_names == ["comp", "gen"]
    # loading: the renamed copy next to the others; the PEFT round trip and the merged model compute the trained "gen"
    restored, peft_gen, merged = ns["restored"], ns["from_peft"], ns["merged"]
    assert hlora.get_config(restored).plugin_names == ["comp", "gen", "gen_v1"]
    assert merged is model and hlora.get_config(merged) is None and not hlora.adapter_layers(merged)
    ids = ns["input_ids"]
    with torch.no_grad():
        hlora.set_task(restored, "gen")
        want = restored.eval()(input_ids=ids).logits
        hlora.set_task(restored, "gen_v1")
        assert torch.equal(restored(input_ids=ids).logits, want)
        torch.testing.assert_close(peft_gen.eval()(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(merged.eval()(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(want, ns["base_logits"])
