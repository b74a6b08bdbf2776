"""The Redis broker transport of ponos-vast: kombu's, with one fix so that a worker survives a
Redis restart (celery_settings.broker_transport selects it for the worker, beat, Flower and
every producer).

Why: when Redis goes away while the worker's consumer waits in BRPOP, Celery 5.7's consumer
(`on_connection_error_after_connected`) first calls `connection.collect()`, then
`connection.close()` on the same connection. kombu's redis `Channel.close()` starts by reading
the pending BRPOP reply (so that a message popped during the close is not lost) and only
catches `Empty` there; with Redis gone that read raises `ConnectionError`, so the channel is
left half closed (not `closed`, its unacknowledged messages not restored) and `collect()`
detaches the transport from its connection (`transport.client = None`). The second close then
runs the channel's full close: restoring the unacknowledged messages builds a Redis client
from `transport.client.hostname`, and the worker dies with
`Unrecoverable error: AttributeError("'NoneType' object has no attribute 'hostname'")` (the
same class of crash as kombu issue 582). It happens whenever a message is unacknowledged at
that moment, which with acks_late and a sync every few seconds is nearly always.

The fix, in two parts, each enough on its own for the crash seen:
- a BRPOP read that fails with a connection error during close counts as "nothing to read"
  (the connection is dead: nothing more can arrive on it), so the first close completes;
- a channel remembers its connection's parameters, so a late use after the transport was
  detached (restoring or acknowledging a message at close or after a task finished) talks to
  the same Redis instead of failing on `None`. If Redis is still down that raises a
  connection error, which kombu and Celery already ignore at close; the message then stays in
  Redis's unacked set and is redelivered after the visibility timeout (or, if Redis lost its
  data, the sync loop resumes the task from Arkindex and the instances).
"""

from __future__ import annotations

from kombu.transport import redis as kombu_redis


class Channel(kombu_redis.Channel):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # The kombu Connection this channel was opened for; kept because collect() sets the
        # transport's `client` to None while the channel may still be used.
        self._conninfo = self.connection.client

    def _connparams(self, asynchronous=False):
        transport = self.connection
        if transport.client is None and self._conninfo is not None:
            # Detached by Connection.collect(): the parameters are the same as before.
            transport.client = self._conninfo
            try:
                return super()._connparams(asynchronous=asynchronous)
            finally:
                transport.client = None
        return super()._connparams(asynchronous=asynchronous)

    def close(self):
        if self._in_poll and not self.closed:
            try:
                self._brpop_read()
            except (kombu_redis.Empty, *self.connection_errors):
                # Empty: nothing was popped. A connection error: the connection is dead, so
                # nothing popped can still be delivered on it; either way, close the rest.
                pass
        super().close()


class Transport(kombu_redis.Transport):
    Channel = Channel
