"""Image config lookups against the local registry simulator (never a real registry)."""

import pytest

from ponos_tasks.registry_client import (
    ImageConfigUnavailable,
    ImageReference,
    RegistryClient,
    parse_image_reference,
)
from ponos_tasks.simulators.registry import RegistrySimulator
from ponos_tasks.state import ImageConfigCache, Keyspace
from tests.conftest import free_port

DIGEST = "sha256:" + "a" * 64


@pytest.mark.parametrize(
    ("image", "expected", "api_host"),
    [
        (
            "ubuntu",
            ImageReference("docker.io", "library/ubuntu", "latest", None),
            "registry-1.docker.io",
        ),
        (
            "ubuntu:22.04",
            ImageReference("docker.io", "library/ubuntu", "22.04", None),
            "registry-1.docker.io",
        ),
        (
            "teklia/worker:1.0",
            ImageReference("docker.io", "teklia/worker", "1.0", None),
            "registry-1.docker.io",
        ),
        (
            "docker.io/library/redis",
            ImageReference("docker.io", "library/redis", "latest", None),
            "registry-1.docker.io",
        ),
        (
            "index.docker.io/nginx",
            ImageReference("docker.io", "library/nginx", "latest", None),
            "registry-1.docker.io",
        ),
        (
            f"python@{DIGEST}",
            ImageReference("docker.io", "library/python", None, DIGEST),
            "registry-1.docker.io",
        ),
        (
            f"python:3.12@{DIGEST}",
            ImageReference("docker.io", "library/python", "3.12", DIGEST),
            "registry-1.docker.io",
        ),
        (
            "registry.gitlab.teklia.com/arkindex/ponos-agent:latest",
            ImageReference("registry.gitlab.teklia.com", "arkindex/ponos-agent", "latest", None),
            "registry.gitlab.teklia.com",
        ),
        (
            "127.0.0.1:5000/team/w:t",
            ImageReference("127.0.0.1:5000", "team/w", "t", None),
            "127.0.0.1:5000",
        ),
        ("localhost/w", ImageReference("localhost", "w", "latest", None), "localhost"),
        (
            "localhost:5000/a/b/c",
            ImageReference("localhost:5000", "a/b/c", "latest", None),
            "localhost:5000",
        ),
        (
            "ghcr.io/org/img:v1.2.3-rc_1",
            ImageReference("ghcr.io", "org/img", "v1.2.3-rc_1", None),
            "ghcr.io",
        ),
    ],
)
def test_parse_image_reference(image, expected, api_host):
    ref = parse_image_reference(image)
    assert ref == expected
    assert ref.api_host == api_host
    assert ref.reference == (expected.digest or expected.tag)


@pytest.mark.parametrize(
    "image",
    ["", "UPPER/case", "a b", "name:bad tag", "name@sha256", "name:", "/abs", "name@nodigest"],
)
def test_parse_image_reference_rejects(image):
    with pytest.raises(ValueError):
        parse_image_reference(image)


@pytest.fixture
def registry():
    with RegistrySimulator() as sim:
        yield sim


def count(sim, fragment, method=None):
    return sum(
        1
        for r in sim.requests
        if fragment in r["path"] and (method is None or r["method"] == method)
    )


def test_single_manifest(registry):
    registry.add_image("team/worker", "1.0", entrypoint=["/entry.sh"], cmd=["run", "--fast"])
    config = RegistryClient().image_config(f"{registry.host}/team/worker:1.0")
    assert config.entrypoint == ["/entry.sh"]
    assert config.cmd == ["run", "--fast"]
    assert config.command == ["/entry.sh", "run", "--fast"]
    assert config.manifest_digest.startswith("sha256:")


@pytest.mark.parametrize("oci", [True, False], ids=["oci-index", "docker-list"])
def test_index_resolves_to_linux_amd64(registry, oci):
    registry.add_image(
        "multi",
        "latest",
        cmd=["python", "-m", "worker"],
        oci=oci,
        platforms=[("linux", "arm64"), ("linux", "amd64"), ("windows", "amd64")],
        attestation=True,
    )
    config = RegistryClient().image_config(f"{registry.host}/multi")
    assert config.entrypoint is None
    assert config.command == ["python", "-m", "worker"]


def test_index_without_amd64(registry):
    registry.add_image("armonly", "1", cmd=["x"], platforms=[("linux", "arm64")])
    with pytest.raises(ImageConfigUnavailable, match="no linux/amd64 image"):
        RegistryClient().image_config(f"{registry.host}/armonly:1")


def test_by_digest_and_cache(registry, redis_client, key_prefix):
    digest = registry.add_image("w", "1", entrypoint=["worker"])
    image = f"{registry.host}/w@{digest}"
    client = RegistryClient(shared_cache=ImageConfigCache(redis_client, Keyspace(key_prefix)))
    assert client.image_config(image).command == ["worker"]
    before = len(registry.requests)
    assert client.image_config(image).command == ["worker"]
    assert len(registry.requests) == before  # a digest is immutable: no request at all
    # A tag costs one HEAD once its digest is known.
    client.image_config(f"{registry.host}/w:1")
    before = len(registry.requests)
    client.image_config(f"{registry.host}/w:1")
    assert [r["method"] for r in registry.requests[before:]] == ["HEAD"]
    # Another process (new client) finds it in Redis: no blob fetched.
    blobs = count(registry, "/blobs/")
    other = RegistryClient(shared_cache=ImageConfigCache(redis_client, Keyspace(key_prefix)))
    assert other.image_config(f"{registry.host}/w:1").command == ["worker"]
    assert count(registry, "/blobs/") == blobs


def test_moved_tag_is_seen(registry):
    registry.add_image("w", "stable", cmd=["v1"])
    client = RegistryClient()
    assert client.image_config(f"{registry.host}/w:stable").cmd == ["v1"]
    registry.add_image("w", "stable", cmd=["v2"])
    assert client.image_config(f"{registry.host}/w:stable").cmd == ["v2"]


def test_lru_is_bounded(registry):
    client = RegistryClient(cache_size=2)
    for number in range(4):
        registry.add_image("w", str(number), cmd=[str(number)])
        client.image_config(f"{registry.host}/w:{number}")
    assert len(client._cache) == 2


def test_not_found_and_no_command(registry):
    registry.add_image("empty", "1")
    client = RegistryClient()
    with pytest.raises(ImageConfigUnavailable, match="not found"):
        client.image_config(f"{registry.host}/nothing:1")
    with pytest.raises(ImageConfigUnavailable, match="not found"):
        client.image_config(f"{registry.host}/empty:2")
    with pytest.raises(ImageConfigUnavailable, match="neither Entrypoint nor Cmd"):
        client.image_command(f"{registry.host}/empty:1")
    with pytest.raises(ImageConfigUnavailable, match="invalid"):
        client.image_config("Not A Reference")


def test_unreachable_registry():
    client = RegistryClient(retries=0, timeout=(1, 1))
    with pytest.raises(ImageConfigUnavailable, match=r"registry 127\.0\.0\.1:\d+ unreachable"):
        client.image_config(f"127.0.0.1:{free_port()}/w:1")


def test_basic_auth():
    with RegistrySimulator(auth="basic", users={"bob": "s3cret"}) as sim:
        sim.add_image("private/w", "1", cmd=["go"])
        image = f"{sim.host}/private/w:1"
        with pytest.raises(ImageConfigUnavailable, match="requires a login.*has none"):
            RegistryClient().image_config(image)
        with pytest.raises(ImageConfigUnavailable, match="refused access"):
            RegistryClient([(sim.host, "bob", "wrong")]).image_config(image)
        client = RegistryClient([(sim.host, "bob", "s3cret")])
        assert client.image_command(image) == ["go"]
        # Once the registry is known to want Basic, the login is sent up front.
        sim.add_image("private/w", "2", cmd=["again"])
        before = len(sim.requests)
        client.image_config(f"{sim.host}/private/w:2")
        assert all(r["auth"] == "Basic" for r in sim.requests[before:] if "/v2/" in r["path"])


def test_token_auth_with_credentials_and_token_reuse():
    with RegistrySimulator(auth="token", users={"bob": "pw"}) as sim:
        sim.add_image("team/w", "1", entrypoint=["w"])
        sim.add_image("team/w", "2", entrypoint=["w2"])
        client = RegistryClient([(sim.host, "bob", "pw")])
        assert client.image_command(f"{sim.host}/team/w:1") == ["w"]
        assert client.image_command(f"{sim.host}/team/w:2") == ["w2"]
        assert count(sim, "/token") == 1
        bearer = [r for r in sim.requests if "/v2/team/w/" in r["path"] and r["auth"]]
        assert bearer and all(r["auth"] == "Bearer" for r in bearer)
        assert all(
            r["accept"] and "application/vnd.oci.image.index.v1+json" in r["accept"]
            for r in sim.requests
            if "/manifests/" in r["path"]
        )


def test_token_auth_public_anonymous_private_refused():
    with RegistrySimulator(auth="token", users={"bob": "pw"}, public={"pub/w"}) as sim:
        sim.add_image("pub/w", "1", cmd=["public"])
        sim.add_image("priv/w", "1", cmd=["private"])
        client = RegistryClient()
        assert client.image_command(f"{sim.host}/pub/w:1") == ["public"]
        with pytest.raises(ImageConfigUnavailable, match="no credentials"):
            client.image_config(f"{sim.host}/priv/w:1")
        with pytest.raises(ImageConfigUnavailable, match="token service answered HTTP 401"):
            RegistryClient([(sim.host, "bob", "bad")]).image_config(f"{sim.host}/priv/w:1")


def test_credentials_from_agent_config(tmp_path):
    from ponos_tasks.config import load_config

    with RegistrySimulator(auth="token", users={"deploy": "tok"}) as sim:
        sim.add_image("w", "1", cmd=["ok"])
        path = tmp_path / "agent.yml"
        path.write_text(
            "url: http://127.0.0.1:1\nfarm_id: 2c3d0f4e-1a2b-4c5d-8e9f-0a1b2c3d4e5f\n"
            "seed: s\nvast_api:\n  api_key: k\n  registries:\n"
            f"    - url: http://{sim.host}\n      username: deploy\n      password_env: REG\n"
        )
        config = load_config(str(path), {"REG": "tok"})
        client = RegistryClient(config.vast_api.registries)
        assert client.image_command(f"{sim.host}/w:1") == ["ok"]


@pytest.mark.parametrize("oci", [True, False], ids=["oci", "docker"])
def test_image_size_is_the_sum_of_the_chosen_platforms_layers(
    registry, redis_client, key_prefix, oci
):
    registry.add_image(
        "big",
        "1",
        cmd=["x"],
        oci=oci,
        platforms=[("linux", "arm64"), ("linux", "amd64")],
        layer_sizes=[3_000_000_000, 1_500_000_000, 12_345],
    )
    cache = ImageConfigCache(redis_client, Keyspace(key_prefix))
    config = RegistryClient(shared_cache=cache).image_config(f"{registry.host}/big:1")
    assert config.size_bytes == 4_500_012_345
    # The size is cached with the command: another process reads it without a manifest GET.
    before = count(registry, "/manifests/", "GET")
    again = RegistryClient(shared_cache=cache).image_config(f"{registry.host}/big:1")
    assert again.size_bytes == 4_500_012_345
    assert count(registry, "/manifests/", "GET") == before


def test_image_without_layers_has_no_known_size(registry):
    registry.add_image("empty", "1", cmd=["x"])
    assert RegistryClient().image_config(f"{registry.host}/empty:1").size_bytes is None
