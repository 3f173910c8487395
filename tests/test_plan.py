import json

import pytest

from datastore.cli import main
from datastore.plan import Costs, measure, plan


def test_plan_scales_with_tokens_and_shards_cap_passages():
    small, big = plan(1.4e9), plan(1.4e12)
    assert big.passages == pytest.approx(1000 * small.passages, rel=1e-6)
    assert big.passages_per_shard <= 50_000_000 and big.shards * big.passages_per_shard >= big.passages
    assert big.lmdb_bytes_total == pytest.approx(1000 * small.lmdb_bytes_total, rel=0.05)
    flat, spann = plan(1e11, index="flat"), plan(1e11, index="spann")
    assert spann.index_ram_bytes_total < 0.05 * flat.index_ram_bytes_total  # heads only in RAM
    assert plan(1e11, index="flat").index_ram_bytes_per_shard == plan(1e11).passages_per_shard * 384 * 4
    assert plan(1e12).query_p99_ms >= plan(1e12).query_p50_ms
    with pytest.raises(ValueError):
        plan(-1)


def test_costs_measured_on_a_built_datastore(built_dir):
    c = measure(built_dir)
    assert 3 < c.text_bytes_per_word < 30  # JSON records in LMDB pages
    assert 2.0 <= c.vector_bytes_per_dim < 4.0  # float16 plus key and page overhead
    assert c.gpu_passages_per_s == Costs().gpu_passages_per_s


def test_plan_cli_json(capsys):
    assert main(["plan", "--tokens", "1.4e12", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["shards"] >= 80 and out["index"] == "spann"
    assert main(["plan", "--tokens", "0"]) == 2
