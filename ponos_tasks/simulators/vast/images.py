"""Image sizes, the hosts' image caches and how long a pull takes (docs/reference.md §1.5).

Vast.ai's documentation says an instance spends its `loading` phase pulling the image: about
30 s when the host already has it, up to hours for a large image on a slow host. The model:

- an image the host has cached (it pulled it before, or it was seeded with `cached_images`)
  costs only the container's creation: `CACHED_START` (drawn 20–40 s, ~30 s);
- a fresh image is downloaded at the host's `inet_down` (Mbit/s, as its offer row says) times
  `LINK_EFFICIENCY` (a docker pull rarely fills the line), capped by what a registry serves
  (`REGISTRY_MB_S`), then extracted at `EXTRACT_MB_S`, then the container is created. A 10 GB
  image takes about 3 minutes on the fastest hosts and about half an hour at 100 Mbit/s.
- the size is `SIM_IMAGE_SIZE_GB` from the instance's env, else a size set through the admin
  API (`POST /_sim/images`) or the constructor (`image_sizes`), else the per-image default
  below (`default_size_gb`).

Hosts remember every image they pulled to the end (Vast.ai hosts keep a docker image cache;
that is why a cached start is fast); nothing is evicted.
"""

import hashlib

CACHED_START = (20.0, 40.0)  # simulated seconds to create and start a container, image cached
LINK_EFFICIENCY = 0.5  # fraction of inet_down a docker pull achieves
REGISTRY_MB_S = 120.0  # a registry rarely serves one client faster than this (MB/s)
EXTRACT_MB_S = 150.0  # layer extraction on the host's disk (MB/s)
LAYERS = 4  # layers shown in the docker-pull-like progress

# Per-image defaults (GB, compressed as pulled), first match by substring; public sizes of
# the usual GPU images on Docker Hub: CUDA "devel" and PyTorch devel images are 8–12 GB,
# "runtime" ones 3–5 GB, Vast.ai's base image about 3 GB.
DEFAULT_SIZES_GB = [
    ("devel", 9.0),
    ("runtime", 4.0),
    ("vastai/base-image", 3.0),
    ("pytorch", 7.0),
    ("tensorflow", 6.0),
    ("alpine", 0.01),
    ("busybox", 0.005),
]
UNKNOWN_SIZE_GB = 6.0  # an Arkindex GPU worker image (torch + CUDA libraries): a few GB


def default_size_gb(image: str) -> float:
    for needle, size in DEFAULT_SIZES_GB:
        if needle in image:
            return size
    return UNKNOWN_SIZE_GB


class Images:
    """Sizes and caches; the state's lock protects it."""

    def __init__(self, sizes: dict | None = None, cached: tuple | list = ()):
        self.sizes: dict[str, float] = {str(k): float(v) for k, v in (sizes or {}).items()}
        self.everywhere: set[str] = set(cached)  # cached on every host, present and future
        self.by_machine: dict[int, set[str]] = {}

    def size_gb(self, image: str, env: dict) -> float:
        raw = env.get("SIM_IMAGE_SIZE_GB")
        if raw not in (None, ""):
            try:
                return max(0.0, float(raw))
            except (TypeError, ValueError):
                pass
        return self.sizes.get(image, default_size_gb(image))

    def cached(self, machine_id: int, image: str) -> bool:
        return image in self.everywhere or image in self.by_machine.get(machine_id, set())

    def remember(self, machine_id: int, image: str) -> None:
        self.by_machine.setdefault(machine_id, set()).add(image)

    def snapshot(self) -> dict:
        return {
            "sizes_gb": dict(self.sizes),
            "cached_everywhere": sorted(self.everywhere),
            "cached_by_machine": {str(m): sorted(i) for m, i in self.by_machine.items()},
        }


def plan(size_gb: float, inet_down_mbit: float, cached: bool, rng) -> dict:
    """Seconds for each phase of one pull: download, extract, create."""
    create = rng.uniform(*CACHED_START)
    if cached:
        return {"size_mb": size_gb * 1000.0, "download": 0.0, "extract": 0.0, "create": create}
    size_mb = size_gb * 1000.0
    rate = min(max(inet_down_mbit, 1.0) / 8.0 * LINK_EFFICIENCY, REGISTRY_MB_S)
    return {
        "size_mb": size_mb,
        "download": size_mb / rate,
        "extract": size_mb / EXTRACT_MB_S,
        "create": create,
    }


def _human(mb: float) -> str:
    return f"{mb / 1000.0:.2f}GB" if mb >= 1000 else f"{mb:.1f}MB"


def _layer_id(image: str, index: int) -> str:
    return hashlib.sha256(f"{image}#{index}".encode()).hexdigest()[:12]


def _bar(fraction: float, width: int = 50) -> str:
    done = int(fraction * width)
    head = ">" if done < width else ""
    return "[" + "=" * done + head + " " * (width - done - len(head)) + "]"


def progress_message(image: str, pull: dict, elapsed: float) -> str:
    """What `status_msg` shows `elapsed` seconds into a pull (docker pull's own lines)."""
    download, extract = pull["download"], pull["extract"]
    size_mb = pull["size_mb"]
    if download <= 0:
        return f"Status: Image is up to date for {image}; creating container"
    layer_mb = size_mb / LAYERS
    if elapsed < download:
        got = size_mb * elapsed / download
        index = min(int(got // layer_mb), LAYERS - 1)
        within = got - index * layer_mb
        return (
            f"{_layer_id(image, index)}: Downloading {_bar(within / layer_mb)} "
            f"{_human(within)}/{_human(layer_mb)}"
        )
    if elapsed < download + extract:
        done = size_mb * (elapsed - download) / extract
        index = min(int(done // layer_mb), LAYERS - 1)
        within = done - index * layer_mb
        return (
            f"{_layer_id(image, index)}: Extracting {_bar(within / layer_mb)} "
            f"{_human(within)}/{_human(layer_mb)}"
        )
    return f"Status: Downloaded newer image for {image}; creating container"
