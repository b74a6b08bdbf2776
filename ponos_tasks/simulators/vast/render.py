"""The instance object as Vast.ai returns it, quirks included (docs/reference.md §1.4)."""

import re

# Columns computed at query time: v1 select_filters refuses them with a 400.
COMPUTED_COLUMNS = {
    "dph_total",
    "num_gpus",
    "duration",
    "uptime_mins",
    "search",
    "instance",
    "dph_base",
    "storage_total_cost",
    "time_remaining",
    "time_remaining_isbid",
    "ports",
    "extra_env",
    "public_ipaddr",
    "local_ipaddrs",
    "gpu_totalram",
    "dlperf_per_dphtotal",
    "flops_per_dphtotal",
    "score",
    "credit_balance",
}

PORT_KEY = re.compile(r"^-p\s+(\d+):(\d+)(/(tcp|udp))?$")


def _ports(inst, base_port: int) -> dict:
    """One entry per `-p HOST:CONTAINER` env key, plus 22 and 8080 for direct runtypes."""
    container_ports = []
    for key in inst.env:
        match = PORT_KEY.match(str(key).strip())
        if match:
            container_ports.append(f"{match.group(2)}/{match.group(4) or 'tcp'}")
    if "direc" in inst.runtype:
        container_ports[:0] = ["22/tcp"] + (["8080/tcp"] if "jupyter" in inst.runtype else [])
    ports = {}
    for index, port in enumerate(dict.fromkeys(container_ports)):
        ports[port] = [
            {"HostIp": "0.0.0.0", "HostPort": str(base_port + index)},
            {"HostIp": "::", "HostPort": str(base_port + index)},
        ]
    return ports


def instance_object(inst, *, actual_status, clock, now: float) -> dict:
    offer = inst.offer_row
    running = actual_status == "running"
    gpu_hour = inst.gpu_dph if running else 0.0
    price = {
        "gpuCostPerHour": gpu_hour,
        "diskHour": inst.storage_dph,
        "totalHour": gpu_hour + inst.storage_dph,
        "discountTotalHour": 0.0,
        "discountedTotalPerHour": gpu_hour + inst.storage_dph,
    }
    base_port = 20000 + (inst.id % 2000) * 10
    start_date = clock.epoch(inst.created_at)
    uptime = None
    if inst.running_since is not None and running:
        uptime = (now - inst.running_since) / 60.0
    ssh_idx = str(inst.id % 20 + 1)
    obj = {
        "id": inst.id,
        "machine_id": inst.machine_id,
        "host_id": offer["host_id"],
        "bundle_id": inst.offer_id,
        "label": inst.label,
        "template_id": None,
        "template_hash_id": None,
        "template_name": None,
        "image_uuid": inst.image,
        "image_args": list(inst.args or []),
        "image_runtype": inst.runtype,
        "extra_env": [[str(k), str(v)] for k, v in inst.env.items()],
        "onstart": inst.onstart,
        "jupyter_token": None,
        "is_bid": inst.is_bid,
        "min_bid": offer["min_bid"],
        "actual_status": actual_status,
        "intended_status": inst.intended_status,
        "cur_state": inst.cur_state,
        "next_state": inst.next_state,
        "status_msg": inst.status_msg,
        "start_date": start_date,
        "end_date": start_date + offer["duration"] / clock.time_scale,
        "uptime_mins": uptime,
        "duration": None,
        "time_remaining": "",
        "time_remaining_isbid": "",
        # Trailing whitespace as Vast sends it, to catch clients that do not strip.
        "public_ipaddr": offer["public_ipaddr"] + "\n",
        "local_ipaddrs": f"10.{inst.machine_id % 250}.0.5 172.17.0.2\n",
        "ssh_host": f"ssh{ssh_idx}.vast.ai",
        "ssh_port": base_port + 9,
        "ssh_idx": ssh_idx,
        "machine_dir_ssh_port": base_port + 8,
        "direct_port_count": offer["direct_port_count"],
        "direct_port_start": base_port if offer["direct_port_count"] else -1,
        "direct_port_end": base_port + 7 if offer["direct_port_count"] else -1,
        "ports": _ports(inst, base_port) if running else None,
        "static_ip": offer["static_ip"],
        "geolocation": offer["geolocation"],
        "country_code": offer["geolocation"].rsplit(",", 1)[-1].strip(),
        "num_gpus": inst.num_gpus,
        "gpu_name": offer["gpu_name"],
        "gpu_arch": offer["gpu_arch"],
        "gpu_ram": offer["gpu_ram"],
        "gpu_totalram": offer["gpu_total_ram"],
        "gpu_frac": offer["gpu_frac"],
        "gpu_lanes": offer["gpu_lanes"],
        "gpu_mem_bw": offer["gpu_mem_bw"],
        "gpu_util": 87.0 if running else None,
        "gpu_temp": 61.0 if running else None,
        "bw_nvlink": offer["bw_nvlink"],
        "cuda_max_good": offer["cuda_max_good"],
        "driver_version": offer["driver_version"],
        "cpu_name": offer["cpu_name"],
        "cpu_arch": offer["cpu_arch"],
        "cpu_cores": offer["cpu_cores"],
        "cpu_cores_effective": offer["cpu_cores_effective"],
        "cpu_ram": offer["cpu_ram"],
        "cpu_util": 12.5 if running else 0.0,
        "mem_limit": None,
        "mem_usage": None,
        "vmem_usage": None,
        "disk_name": offer["disk_name"],
        "disk_space": inst.disk,
        "disk_bw": offer["disk_bw"],
        "disk_util": 0.0,
        "disk_usage": -1,
        "inet_up": offer["inet_up"],
        "inet_down": offer["inet_down"],
        "mobo_name": offer["mobo_name"],
        "pci_gen": offer["pci_gen"],
        "pcie_bw": offer["pcie_bw"],
        "os_version": offer["os_version"],
        "verification": offer["verification"],
        "rentable": True,
        "hosting_type": offer["hosting_type"],
        "external": offer["external"],
        "dph_base": inst.gpu_dph,
        "dph_total": inst.dph_total,
        "storage_cost": offer["storage_cost"],
        "storage_total_cost": inst.storage_dph,
        "vram_costperhour": offer["vram_costperhour"],
        "search": dict(price),
        "instance": price,
        "credit_balance": None,
        "credit_discount": None,
        "credit_discount_max": offer["credit_discount_max"],
        "client_run_time": inst.gpu_seconds / 3600.0,
        "host_run_time": inst.gpu_seconds / 3600.0,
        "dlperf": offer["dlperf"],
        "dlperf_per_dphtotal": offer["dlperf"] / inst.dph_total,
        "flops_per_dphtotal": offer["total_flops"] / inst.dph_total,
        "total_flops": offer["total_flops"],
        "score": offer["score"],
        "reliability2": offer["reliability2"],
        "volume_info": [],
    }
    return obj
