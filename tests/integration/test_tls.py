"""TLS on every gRPC link, on real servers: stages talk mutual TLS (a stage accepts only peers
with a certificate from the deployment's CA: no certificate, a certificate from another CA or
plain text are all refused), the front door serves TLS, and a request through it is still
token-exact (the decode worker pulls the KV from prefill over mutual TLS)."""
from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from prism.runtime.tls import make_certs
from tests.integration.cluster import LocalCluster, chat, collect
from tests.oracle import Oracle


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("other-pki"), ca_name="Someone else's CA")


async def health(channel: grpc.aio.Channel, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return (await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)).status


async def refused(channel: grpc.aio.Channel, service: str) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await health(channel, service)
    await channel.close()
    return exc.value.code()


async def test_stages_accept_only_peers_with_the_deployments_certificate(tiny_models, certs, other_ca):
    oracle = Oracle(tiny_models["llava"])
    async with LocalCluster(tiny_models["llava"], [("encode",), ("prefill",), ("decode",)], tls=certs) as c:
        from tests.conftest import png_bytes, random_image

        tokens, _ = await collect(c.stub, chat("over tls", [png_bytes(9)], 5))
        assert tokens == oracle.chat("over tls", [random_image(9)], 5)

        decode = c.hosts[c.named(("decode",))[0]].address
        service = "prism.v1.DecodeService"
        name = (("grpc.ssl_target_name_override", "prism"),)
        ca = certs.ca.read_bytes()
        assert await refused(grpc.aio.insecure_channel(decode), service) is grpc.StatusCode.UNAVAILABLE
        no_cert = grpc.ssl_channel_credentials(root_certificates=ca)
        assert await refused(grpc.aio.secure_channel(decode, no_cert, options=name), service) \
            is grpc.StatusCode.UNAVAILABLE
        foreign = grpc.ssl_channel_credentials(root_certificates=ca, private_key=other_ca.key.read_bytes(),
                                               certificate_chain=other_ca.cert.read_bytes())
        assert await refused(grpc.aio.secure_channel(decode, foreign, options=name), service) \
            is grpc.StatusCode.UNAVAILABLE
        ours = grpc.ssl_channel_credentials(root_certificates=ca, private_key=certs.key.read_bytes(),
                                            certificate_chain=certs.cert.read_bytes())
        async with grpc.aio.secure_channel(decode, ours, options=name) as channel:
            assert await health(channel, service) == health_pb2.HealthCheckResponse.SERVING

        # The front door: TLS for any caller that trusts the CA; plain text is refused.
        front = c.scheduler.address
        assert await refused(grpc.aio.insecure_channel(front), "prism.v1.PrismService") \
            is grpc.StatusCode.UNAVAILABLE
        async with grpc.aio.secure_channel(front, no_cert) as channel:
            assert await health(channel, "prism.v1.PrismService") == health_pb2.HealthCheckResponse.SERVING


def test_tls_settings_are_checked(tmp_path, certs):
    from prism.runtime.config import ConfigError
    from prism.runtime.server import ServerConfig

    with pytest.raises(ConfigError, match="tls_key"):
        ServerConfig(tls_cert=certs.cert)
    with pytest.raises(ConfigError, match="tls_ca"):
        ServerConfig(tls_ca=certs.ca)
    with pytest.raises(ConfigError, match="tls_cert"):
        ServerConfig(tls_cert=tmp_path / "missing.pem", tls_key=certs.key)
    assert oct(certs.key.stat().st_mode & 0o777) == "0o600"


async def test_queues_on_a_password_protected_redis(tiny_models, tmp_path):
    """Redis with a password: the deployment works with it in the URL; without it, nothing."""
    import redis.asyncio as aioredis
    from redis.exceptions import AuthenticationError, ResponseError

    from prism.runtime.redisproc import RedisProcess

    with RedisProcess(tmp_path / "redis", password="s3cret/with:odd@chars") as server:
        bare = aioredis.Redis(host=server.host, port=server.port)
        with pytest.raises((AuthenticationError, ResponseError), match="(?i)auth"):
            await bare.keys("*")
        await bare.aclose()
        oracle = Oracle(tiny_models["llava"])
        async with LocalCluster(tiny_models["llava"], [("prefill",), ("decode",)], redis_url=server.url) as c:
            tokens, _ = await collect(c.stub, chat("behind a password", [], 4))
        assert tokens == oracle.chat("behind a password", [], 4)
