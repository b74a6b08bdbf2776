"""parse_filters against the official CLI's own parser (vastai 1.9.x `parse_query`).

The official package lives in its own virtual environment (.venvs/vastai, shared with the CLI
test; created once and reused). For every query both accept, the official output, once typed
by parse_filters, equals ours (ours keeps a wildcard as {} where the CLI deletes the key).
Queries the CLI refuses, parse_filters refuses too.
"""

import json
import subprocess
from pathlib import Path

import pytest

from ponos_tasks.offers import OfferFilterError, parse_filters
from tests.tool_venvs import tool_bin

pytestmark = pytest.mark.vastai_cli

REPO = Path(__file__).resolve().parents[1]

ACCEPTED_BY_BOTH = [
    "gpu_name=RTX_4090 num_gpus=1 reliability>0.98 dph<0.5",
    "gpu_ram>=24 cpu_ram>16 duration>7 disk_space>=50",
    'gpu_name in ["RTX 4090", "RTX 3090"] geolocation notin [CN,VN]',
    "verified=any rented=False cuda_vers>=12.1 driver_version>=535.86.05",
    "reliability eq 0.9 dph neq 0.5 inet_up gt 100 inet_down gte 200 disk_bw lt 9 gpu_frac lte 1",
    "cpu_cores noteq 4 cpu_ghz not eq 3 gpu_name nin [A40] gpu_arch not in [amd]",
    "reliability > 0.98   dph <= 0.5 num_gpus>=1 num_gpus<=4",
    'gpu_name="H100 SXM" static_ip=true external=null has_avx=1',
    "gpu_total_ram>80 dlperf_usd>10 flops_usd>1 display_active=false ubuntu_version=22.04",
    "verified=true verified=any rentable=? gpu_name=*",
    "gpu_name=[RTX_A6000] compute_cap in [800,890] geolocation=us",
    "dph<0.9 dph<0.5 min_bid<=0.2 storage_cost<1 direct_port_count>=2 pcie_bw>10",
]

REFUSED_BY_BOTH = [
    "dph=>0.5",  # unknown operator
    "gpu_name=RTX 4090",  # an unquoted space
    "dph<1 & reliability>0.9",  # unconsumed text
    "gpu_name>any",  # wildcard with another operator
    "gpu_name in []",  # blank value
]

PARSER = """
import json, sys
from vastai.api.query import offers_alias, offers_fields, offers_mult, parse_query
answers = []
for text in json.load(sys.stdin):
    try:
        answers.append({"ok": parse_query(text, {}, offers_fields, offers_alias, offers_mult)})
    except ValueError as exc:
        answers.append({"error": str(exc)})
print(json.dumps(answers))
"""


@pytest.fixture(scope="module")
def official():
    """{query text: the official parser's answer}, from one subprocess."""
    python = tool_bin("vastai", "python")
    texts = ACCEPTED_BY_BOTH + REFUSED_BY_BOTH
    result = subprocess.run(
        [str(python), "-c", PARSER],
        input=json.dumps(texts),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return dict(zip(texts, json.loads(result.stdout), strict=True))


@pytest.mark.parametrize("text", ACCEPTED_BY_BOTH)
def test_same_query_as_the_official_parser(official, text):
    answer = official[text]
    assert "ok" in answer, answer
    ours = {field: cond for field, cond in parse_filters(text).items() if cond}
    assert parse_filters(answer["ok"]) == ours


@pytest.mark.parametrize("text", REFUSED_BY_BOTH)
def test_refused_like_the_official_parser(official, text):
    assert "error" in official[text], official[text]
    with pytest.raises(OfferFilterError):
        parse_filters(text)
