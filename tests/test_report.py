"""The report: sizes measured from the written file against the analytic size, OPs as method.md section 7
counts them, FP FLOPs against torch.utils.flop_counter, per-block totals, JSON and the chart."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import didbq
from didbq.convert.recipe import PAPER_DIDB, parse_recipe
from didbq.errors import DidbqError
from didbq.export import write_packed
from didbq.report import Report, check_file, reference_macs, report_for_file, report_for_model

# method.md section 7: binary DeiT-S at 224x224 with 1000 classes.
DEIT_S = {"bops": 4_540_695_552, "flops": 58_186_752, "ops": 129_135_120}


@pytest.fixture(scope="module")
def deit_small() -> Report:
    return report_for_model("deit_small_patch16_224", "xnor")


@pytest.fixture(scope="module")
def fp32_safetensors(tmp_path_factory: pytest.TempPathFactory) -> int:
    """Bytes of the unconverted deit_small (1000 classes) as an fp32 safetensors file."""
    model = didbq.build_model("deit_small_patch16_224")
    path = tmp_path_factory.mktemp("fp32") / "deit_small.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path.stat().st_size


def test_deit_small_packed_file_is_the_analytic_size_and_14x_smaller(deit_small: Report,
                                                                     fp32_safetensors: int) -> None:
    file, totals = deit_small.file, deit_small.plan.totals
    assert file.ok and file.analytic_bytes == totals.packed_bytes
    assert file.file_bytes == pytest.approx(totals.packed_bytes, rel=0.01)  # the header included
    assert totals.packed_bytes == pytest.approx(6.1e6, rel=0.01)
    assert fp32_safetensors == pytest.approx(88.2e6, rel=0.01)
    assert fp32_safetensors / file.file_bytes >= 14


def test_deit_small_with_fp16_parts_is_20x_smaller(deit_small: Report, fp32_safetensors: int,
                                                   tmp_path: Path) -> None:
    model = deit_small.plan.model
    path = write_packed(model, tmp_path / "fp16.safetensors", model_name="deit_small_patch16_224", model_args={},
                        recipe=deit_small.plan.recipe, fp_dtype="float16")
    file = check_file(path, model)
    assert file.ok and file.analytic_bytes == deit_small.plan.totals.packed_bytes_fp16
    assert file.file_bytes == pytest.approx(4.4e6, rel=0.01)
    assert fp32_safetensors / file.file_bytes >= 20


def test_deit_small_ops_are_the_hand_count(deit_small: Report) -> None:
    totals = deit_small.plan.totals
    for key, expected in DEIT_S.items():
        assert getattr(totals, key) == pytest.approx(expected, rel=0.01), key
    assert deit_small.flop_check.ok and deit_small.flop_check.torch_macs == totals.fp_reference_flops


def test_blocks_and_layers_add_up_to_the_totals(deit_small: Report) -> None:
    totals, blocks = deit_small.plan.totals, deit_small.blocks
    assert sum(b.binary_bytes + b.fp_bytes for b in blocks) == totals.packed_bytes
    assert sum(b.binary_parameters for b in blocks) == totals.binary_parameters
    assert (sum(b.bops for b in blocks), sum(b.flops for b in blocks)) == (totals.bops, totals.flops)
    assert [b.name for b in blocks][:3] == ["cls_token", "pos_embed", "patch_embed"]
    qkv = next(layer for layer in deit_small.plan.layers if layer.name == "blocks.0.attn.qkv")
    assert (qkv.weights, qkv.inputs, qkv.binary_parameters, qkv.fp_parameters) == ("1-bit", "1-bit", 384 * 1152,
                                                                                   1152)
    assert qkv.bytes == 1152 * 384 // 8 + 1152 * 4 + 16 + 1152 * 4  # signs, scales, shape, bias
    products = [layer for layer in deit_small.plan.layers if layer.weights == "-"]
    assert products and all(layer.binary for layer in products)  # xnor: binary Q, K, V and attention matrix


def test_products_with_a_full_precision_operand_are_flops() -> None:
    recipe = didbq.load_recipe("xnor").effective()
    recipe["attention"]["probs"] = "softmax"  # binary Q, K and V, but a real-valued attention matrix
    report = report_for_model("test_vit", parse_recipe(json.dumps(recipe)))
    products = {layer.kind: layer for layer in report.plan.layers if layer.weights == "-"}
    assert products["q·kᵀ"].binary and products["q·kᵀ"].flops == 0
    assert not products["attn·v"].binary and products["attn·v"].bops == 0 and products["attn·v"].inputs == "fp"


def test_json_has_everything(deit_small: Report) -> None:
    data = json.loads(json.dumps(deit_small.as_dict()))
    assert data["file"]["ok"] and data["flop_check"]["ok"] and data["source"] == "analytic"
    assert {"bops", "flops", "ops", "binary_parameters", "fp_parameters", "bytes"} <= set(data["layers"][0])
    assert {"packed_bytes", "packed_bytes_fp16", "fp32_bytes", "compression", "ops"} <= set(data["totals"])
    assert any(k["reason"] == "classifier head" for k in data["full_precision"])


def test_a_written_file_reports_what_the_analytic_report_says(tmp_path: Path) -> None:
    model = didbq.build_model("test_vit")
    analytic = report_for_model("test_vit", PAPER_DIDB)  # with HFSC's added projections
    conversion = didbq.convert.convert(model, PAPER_DIDB)
    path = write_packed(model, tmp_path / "model.safetensors", model_name="test_vit", model_args={},
                        recipe=conversion.recipe, extra={"results": {"s1": {"top1": 50.0, "top5": 90.0}}})
    measured = report_for_file(path)
    assert measured.plan.totals == analytic.plan.totals
    assert measured.file.file_bytes == path.stat().st_size and measured.file.ok
    assert measured.results == {"s1": {"top1": 50.0, "top5": 90.0}} and measured.source == str(path)


def test_a_size_gap_over_one_percent_is_an_error(tmp_path: Path) -> None:
    model = didbq.binarize_model(didbq.build_model("test_vit"), "xnor")
    path = write_packed(model, tmp_path / "model.safetensors", model_name="test_vit", model_args={},
                        recipe=didbq.load_recipe("xnor"))
    with pytest.raises(DidbqError, match="analytic size"):
        check_file(path, didbq.build_model("test_vit"))  # counted as if nothing were binary


@pytest.mark.parametrize("name", ["test_vit", "test_vit2", "test_vit3", "test_vit4"])
def test_fp_flops_match_torch_flop_counter(name: str) -> None:
    report = report_for_model(name, "didb")
    assert report.flop_check.ok, report.flop_check


def test_the_flop_counter_counts_unfused_attention() -> None:
    model = didbq.build_model("test_vit")
    example = torch.randn(2, 3, 160, 160)
    assert reference_macs(model, example) == didbq.plan(didbq.build_model("test_vit"), "xnor").totals \
        .fp_reference_flops


def test_the_chart_is_a_png(tmp_path: Path) -> None:
    from didbq.report import plot_report

    path = plot_report(report_for_model("test_vit", "didb"), tmp_path / "report.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob("*.tmp"))
