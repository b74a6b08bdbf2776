"""The offers market: machines generated from a seed, offers for 1..free GPUs of each.

An offer (ask) is `num_gpus` GPUs of one machine. When GPUs of a machine are rented or
released, all its offers are replaced by new ones with fresh ids, so a rented offer id is
gone for good (Vast.ai's answer to a create on it is 404 `no_such_ask`).
Field names and units follow Vast.ai's offer rows (gpu_ram and cpu_ram in MB, prices
in $/h, storage_cost in $/GB/month, compute_cap = CC×100).
"""

import random
from dataclasses import dataclass, field

# (name, per-GPU RAM MB, compute_cap, base $/h per GPU, TFLOPs per GPU, mem bw GB/s, weight)
GPU_CATALOG = [
    ("RTX 4090", 24564, 890, 0.35, 82.6, 1008, 20),
    ("RTX 3090", 24576, 860, 0.20, 35.6, 936, 18),
    ("RTX 3080", 10240, 860, 0.12, 29.8, 760, 6),
    ("RTX A5000", 24564, 860, 0.22, 27.8, 768, 8),
    ("RTX A6000", 49140, 860, 0.45, 38.7, 768, 6),
    ("RTX 5090", 32607, 1200, 0.60, 104.8, 1792, 6),
    ("A100 PCIE", 40960, 800, 0.75, 19.5, 1555, 5),
    ("A100 SXM4", 81920, 800, 1.10, 19.5, 2039, 6),
    ("H100 PCIE", 81559, 900, 1.80, 51.2, 2039, 4),
    ("H100 SXM", 81559, 900, 2.20, 66.9, 3352, 6),
    ("L40S", 46068, 890, 0.70, 91.6, 864, 5),
    ("Tesla V100", 16384, 700, 0.15, 15.7, 900, 4),
    ("Tesla T4", 15360, 750, 0.08, 8.1, 320, 3),
]

PLACES = [
    ("California", "US"),
    ("Texas", "US"),
    ("Washington", "US"),
    ("Florida", "US"),
    ("Quebec", "CA"),
    ("Ontario", "CA"),
    ("Bulgaria", "BG"),
    ("Norway", "NO"),
    ("Sweden", "SE"),
    ("Netherlands", "NL"),
    ("Germany", "DE"),
    ("France", "FR"),
    ("Poland", "PL"),
    ("Czechia", "CZ"),
    ("Spain", "ES"),
    ("Japan", "JP"),
    ("Taiwan", "TW"),
    ("Vietnam", "VN"),
    ("Guangdong", "CN"),
    ("Hong Kong", "HK"),
    ("New South Wales", "AU"),
    ("Sao Paulo", "BR"),
]

DRIVERS = [
    ("535.86.05", 12.2),
    ("545.29.06", 12.3),
    ("550.54.14", 12.4),
    ("560.35.03", 12.6),
    ("570.124.04", 12.8),
    ("575.57.08", 12.9),
]
CPUS = [
    "AMD EPYC 7543 32-Core Processor",
    "AMD Ryzen 9 7950X 16-Core Processor",
    "Intel Xeon Gold 6342",
    "AMD EPYC 9354 32-Core Processor",
    "Intel Core i9-13900K",
    "AMD Ryzen Threadripper PRO 5975WX",
]
MOBOS = ["ROMED8-2T", "X570 AORUS ELITE", "H12SSL-i", "WRX80E-SAGE", "Z790 AORUS", "MZ32-AR0"]
GPU_COUNTS = [1, 1, 2, 2, 4, 4, 8]


def driver_int(version: str) -> int:
    """`535.86.05` -> 535086005 (how Vast compares driver versions)."""
    return int("".join(part.zfill(3) for part in version.split(".")))


@dataclass
class Machine:
    id: int
    host_id: int
    num_gpus: int
    specs: dict  # machine-level offer fields (per-GPU price in dph_base_per_gpu)
    used_gpus: int = 0
    listed: bool = True  # False: unlisted by churn (no offers)

    @property
    def free_gpus(self) -> int:
        return self.num_gpus - self.used_gpus


@dataclass
class Offer:
    id: int
    machine_id: int
    num_gpus: int
    ghost: bool = False  # still listed after being rented (double_rent fault)


@dataclass
class Market:
    seed: int = 0
    n_machines: int = 120
    machines: dict = field(default_factory=dict)
    offers: dict = field(default_factory=dict)
    rented_offers: dict = field(default_factory=dict)  # offer id -> machine id, once rented

    def __post_init__(self):
        self.rng = random.Random(self.seed)
        self._next_offer_id = 20_000_000 + self.rng.randrange(1_000_000)
        for index in range(self.n_machines):
            machine = self._generate_machine(10_000 + index * 7 + self.rng.randrange(7))
            self.machines[machine.id] = machine
            self.refresh_machine(machine.id)

    # -- generation --------------------------------------------------------------------
    def _generate_machine(self, machine_id: int) -> Machine:
        rng = self.rng
        weights = [entry[6] for entry in GPU_CATALOG]
        name, ram, cc, price, tflops, mem_bw, _ = rng.choices(GPU_CATALOG, weights)[0]
        num_gpus = rng.choice(GPU_COUNTS if cc >= 800 else GPU_COUNTS[:5])
        place, country = rng.choice(PLACES)
        driver, cuda = rng.choice(DRIVERS)
        datacenter = rng.random() < 0.3
        cpu_cores = num_gpus * rng.choice([8, 12, 16, 24, 32])
        reliability = round(rng.uniform(0.90, 0.9999), 4)
        verified = rng.random() < 0.85
        per_gpu = round(price * rng.uniform(0.7, 1.4), 3)
        specs = {
            "host_id": 1000 + rng.randrange(9000),
            "gpu_name": name,
            "gpu_ram": ram,
            "gpu_arch": "nvidia",
            "gpu_mem_bw": float(mem_bw),
            "gpu_max_power": 450.0 if "RTX" in name else 700.0,
            "gpu_max_temp": 83.0,
            "gpu_lanes": 16,
            "gpu_display_active": False,
            "compute_cap": cc,
            "cuda_max_good": cuda,
            "driver_version": driver,
            "driver_vers": driver_int(driver),
            "cpu_name": rng.choice(CPUS),
            "cpu_arch": "amd64",
            "cpu_cores": cpu_cores,
            "cpu_ram": cpu_cores * rng.choice([4000, 8000]),
            "cpu_ghz": round(rng.uniform(2.4, 5.2), 1),
            "has_avx": 1,
            "disk_space": float(rng.choice([100, 250, 500, 1000, 2000])),
            "disk_bw": round(rng.uniform(500, 6000), 1),
            "disk_name": rng.choice(["Samsung SSD 980 PRO", "WD_BLACK SN850X", "Micron 7450"]),
            "inet_up": round(rng.uniform(50, 5000), 1),
            "inet_down": round(rng.uniform(100, 8000), 1),
            "inet_up_cost": round(rng.uniform(0, 0.01), 4),
            "inet_down_cost": round(rng.uniform(0, 0.01), 4),
            "direct_port_count": rng.choice([0, 16, 100, 500]),
            "pci_gen": rng.choice([3.0, 4.0, 5.0]),
            "pcie_bw": round(rng.uniform(6, 50), 1),
            "bw_nvlink": 0.0 if num_gpus == 1 else round(rng.uniform(0, 600), 1),
            "mobo_name": rng.choice(MOBOS),
            "os_version": rng.choice(["20.04", "22.04", "24.04"]),
            "reliability": reliability,
            "reliability2": reliability,
            "reliability_mult": round(reliability**2, 4),
            "verification": "verified" if verified else "unverified",
            "verified": verified,
            "vericode": 1 if verified else 0,
            "external": rng.random() < 0.05,
            "hosting_type": 1 if datacenter else 0,
            "geolocation": f"{place}, {country}",
            "geolocode": 1000 + PLACES.index((place, country)),
            "static_ip": datacenter or rng.random() < 0.4,
            "public_ipaddr": f"{rng.randrange(11, 223)}.{rng.randrange(256)}."
            f"{rng.randrange(256)}.{rng.randrange(1, 255)}",
            "storage_cost": round(rng.uniform(0.05, 0.3), 3),
            "dph_base_per_gpu": per_gpu,
            "min_bid_per_gpu": round(per_gpu * rng.uniform(0.3, 0.7), 4),
            "tflops_per_gpu": tflops,
            "duration": rng.uniform(7, 180) * 86400.0,
            "vms_enabled": rng.random() < 0.2,
        }
        return Machine(id=machine_id, host_id=specs["host_id"], num_gpus=num_gpus, specs=specs)

    def make_cheap_hosts_slow(self, fraction: float, rng: random.Random) -> list[int]:
        """The `slow_cheap_hosts` knob: the cheapest `fraction` of the machines (by $/GPU/h)
        get a slow line (inet_down 20–100 Mbit/s) and a poor record (reliability 0.70–0.90),
        as on Vast.ai, where the lowest prices are often home hosts on consumer links.
        Returns their ids."""
        if fraction <= 0:
            return []
        by_price = sorted(self.machines.values(), key=lambda m: m.specs["dph_base_per_gpu"])
        slow = by_price[: int(round(len(by_price) * min(1.0, fraction)))]
        for machine in slow:
            reliability = round(rng.uniform(0.70, 0.90), 4)
            machine.specs.update(
                inet_down=round(rng.uniform(20, 100), 1),
                reliability=reliability,
                reliability2=reliability,
                reliability_mult=round(reliability**2, 4),
            )
        return [m.id for m in slow]

    def refresh_machine(self, machine_id: int) -> None:
        """Replace the machine's offers by fresh ids for 1..free GPUs (or none if unlisted)."""
        for offer_id in [
            o.id for o in self.offers.values() if o.machine_id == machine_id and not o.ghost
        ]:
            del self.offers[offer_id]
        machine = self.machines[machine_id]
        if not machine.listed:
            return
        for count in range(1, machine.free_gpus + 1):
            offer = Offer(id=self._next_offer_id, machine_id=machine_id, num_gpus=count)
            self._next_offer_id += 1 + self.rng.randrange(3)
            self.offers[offer.id] = offer

    def add_offer(self, partial: dict) -> int:
        """Admin: add a machine and one offer from a partial offer dict; returns the offer id."""
        num_gpus = int(partial.get("num_gpus", 1))
        machine_id = int(partial.get("machine_id", max(self.machines, default=10_000) + 1))
        base = self._generate_machine(machine_id)
        base.num_gpus = max(num_gpus, int(partial.get("machine_gpus", num_gpus)))
        for key, value in partial.items():
            if key in ("id", "num_gpus", "machine_id", "dph_base", "min_bid"):
                continue
            base.specs[key] = value
        if "dph_base" in partial:
            base.specs["dph_base_per_gpu"] = float(partial["dph_base"]) / num_gpus
        if "min_bid" in partial:
            base.specs["min_bid_per_gpu"] = float(partial["min_bid"]) / num_gpus
        if "driver_version" in partial:
            base.specs["driver_vers"] = driver_int(str(partial["driver_version"]))
        base.host_id = base.specs["host_id"]
        self.machines[machine_id] = base
        offer_id = int(partial.get("id", self._next_offer_id))
        self._next_offer_id = max(self._next_offer_id, offer_id) + 1
        self.offers[offer_id] = Offer(id=offer_id, machine_id=machine_id, num_gpus=num_gpus)
        return offer_id

    def clear(self) -> None:
        self.offers.clear()
        for machine in self.machines.values():
            machine.listed = False

    # -- renting -----------------------------------------------------------------------
    def take(self, offer_id: int, keep_listed: bool = False) -> Machine:
        """Rent an available offer: its GPUs become used and the machine's offers change."""
        offer = self.offers[offer_id]
        machine = self.machines[offer.machine_id]
        machine.used_gpus += offer.num_gpus
        self.rented_offers[offer_id] = machine.id
        if keep_listed:
            offer.ghost = True
        else:
            del self.offers[offer_id]
        self.refresh_machine(machine.id)
        return machine

    def release(self, machine_id: int, num_gpus: int) -> None:
        machine = self.machines.get(machine_id)
        if machine is None:
            return
        machine.used_gpus = max(0, machine.used_gpus - num_gpus)
        self.refresh_machine(machine_id)

    def churn(self) -> None:
        """One churn step: a free machine relists with new ids, another toggles its listing."""
        ids = sorted(self.machines)
        relist = self.machines[self.rng.choice(ids)]
        if relist.used_gpus == 0:
            self.refresh_machine(relist.id)
        toggle = self.machines[self.rng.choice(ids)]
        if toggle.used_gpus == 0:
            toggle.listed = not toggle.listed
            self.refresh_machine(toggle.id)

    # -- rendering ---------------------------------------------------------------------
    def render(
        self, offer: Offer, *, allocated_storage: float, offer_type: str, rented: bool
    ) -> dict:
        """The offer row as Vast.ai returns it, priced for `allocated_storage` GB."""
        machine = self.machines[offer.machine_id]
        specs = machine.specs
        n = offer.num_gpus
        dph_base = round(specs["dph_base_per_gpu"] * n, 4)
        min_bid = round(specs["min_bid_per_gpu"] * n, 4)
        disk_hour = specs["storage_cost"] * allocated_storage / 720.0
        gpu_hour = min_bid if offer_type == "bid" else dph_base
        dph_total = gpu_hour + disk_hour
        discount_rate = 0.25 if offer_type == "reserved" else 0.0
        discounted = dph_total * (1 - discount_rate)
        total_flops = specs["tflops_per_gpu"] * n
        dlperf = round(total_flops * 0.9, 2)
        row = {
            key: value
            for key, value in specs.items()
            if key not in ("dph_base_per_gpu", "min_bid_per_gpu", "tflops_per_gpu")
        }
        price = {
            "gpuCostPerHour": gpu_hour,
            "diskHour": disk_hour,
            "totalHour": dph_total,
            "discountTotalHour": dph_total - discounted,
            "discountedTotalPerHour": discounted,
        }
        row.update(
            {
                "id": offer.id,
                "ask_contract_id": offer.id,
                "bundle_id": offer.id,
                "bundled_results": None,
                "machine_id": machine.id,
                "num_gpus": n,
                "gpu_total_ram": specs["gpu_ram"] * n,
                "gpu_frac": round(n / machine.num_gpus, 4),
                "cpu_cores_effective": round(specs["cpu_cores"] * n / machine.num_gpus, 1),
                "dph_base": dph_base,
                "dph_total": dph_total,
                "dph_total_adj": dph_total,
                "min_bid": min_bid,
                "storage_total_cost": disk_hour,
                "vram_costperhour": gpu_hour / (specs["gpu_ram"] * n / 1024),
                "discount_rate": discount_rate,
                "discounted_hourly": discounted,
                "discounted_dph_total": discounted,
                "credit_discount_max": 0.4,
                "search": dict(price),
                "instance": dict(price),
                "total_flops": total_flops,
                "dlperf": dlperf,
                "dlperf_per_dphtotal": dlperf / dph_total,
                "flops_per_dphtotal": total_flops / dph_total,
                "score": round(dlperf / dph_total * specs["reliability"] ** 4 / 10, 3),
                "expected_reliability": specs["reliability"],
                "rentable": True,
                "rented": rented,
                "is_bid": offer_type == "bid",
                "resource_type": "gpu",
                "hostname": f"host{machine.host_id}",
                "webpage": None,
                "logo": "/static/logos/vastai_small2.png",
                "start_date": None,
                "end_date": None,
                "rn": 0,
                "time_remaining": "",
                "time_remaining_isbid": "",
                "is_vm_deverified": False,
                "cluster_id": None,
                "internet_up_cost_per_tb": specs["inet_up_cost"] * 1024,
                "internet_down_cost_per_tb": specs["inet_down_cost"] * 1024,
            }
        )
        return row
