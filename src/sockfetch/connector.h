#pragma once

#include <kj/async-io.h>
#include <kj/function.h>

namespace sockfetch {

using Connector = kj::Function<kj::Promise<kj::Own<kj::AsyncIoStream>>()>;
// Opens a new connection to one upstream each time it is called. A ConnectionPool calls it
// whenever it needs another connection.

Connector addressConnector(kj::NetworkAddress& address);
// Connects to `address` (anything kj's parseAddress() yields: "host:port", "unix:/path", ...).
// `address` must outlive the connector. A failed connect names the address (its type is kj's:
// DISCONNECTED for a refusal).

Connector tunnelConnector(Connector toProxy, kj::StringPtr target);
// Reaches `target` ("host:port", "[v6 address]:port"; throws at once if it has no port, or a
// space or a control character) through an HTTP proxy: connects with `toProxy`, sends
// `CONNECT target HTTP/1.1`, and on a 2xx answer yields the tunnel (bytes the proxy sent after its
// answer included). Interim (1xx) answers before it are skipped. A proxy that answers anything
// else fails with an exception naming its status line: DISCONNECTED for 502 and 504 (it could
// not reach the target), OVERLOADED for 503 and 429 (try later), FAILED otherwise (a refusal).
// One that closes, fails or answers something that is not an HTTP/1.x status line fails with
// what went wrong, naming the CONNECT.

}  // namespace sockfetch
