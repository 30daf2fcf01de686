#pragma once
// Test helpers for sockfetch: a scripted HTTP peer over either an in-process pipe or a real
// loopback TCP connection, so that each behaviour is checked on both transports.

#include <kj/async-io.h>
#include <kj/compat/http.h>
#include <kj/string.h>
#include <kj/test.h>

namespace sockfetch {
namespace test {

class Peer {
  // The server side of one connection, driven by the test: reads what the client wrote and
  // writes scripted bytes back.
public:
  Peer(kj::WaitScope& waitScope, kj::Own<kj::AsyncIoStream> stream)
      : waitScope(waitScope), stream(kj::mv(stream)) {}

  kj::String readRequest();
  // Reads one request head (through the blank line) plus a body if the head announces one by
  // Content-Length or chunked encoding (the body is returned de-chunked after the head).

  kj::String readHead();
  // Reads through the end of the next header block.

  kj::String readExactly(size_t n);

  void send(kj::StringPtr bytes);
  // Writes the bytes and waits until written.

  kj::Promise<void> sendLater(kj::StringPtr bytes);
  // Starts writing; the caller waits on the returned promise (needed for unbuffered pipes).

  bool readWouldBlock();
  // True if nothing at all was written by the client (and it did not close): checks without
  // consuming anything that is buffered.

  bool sawEof();
  // Runs the event loop until the client's side is read to its end; true if it ended (closed)
  // without sending more bytes.

  void close() { stream = nullptr; }
  kj::AsyncIoStream& getStream() { return *stream; }

private:
  kj::WaitScope& waitScope;
  kj::Own<kj::AsyncIoStream> stream;
  kj::Vector<char> buffer;

  void fillAtLeast(size_t n);
  bool tryFill();
};

struct Transport {
  // A connected pair: `client` for the code under test, `peer` for the script.
  kj::Own<kj::AsyncIoStream> client;
  kj::Own<kj::AsyncIoStream> server;
};

Transport pipeTransport();
Transport tcpTransport(kj::AsyncIoContext& io);
// A real loopback TCP connection (127.0.0.1, ephemeral port).

kj::Own<kj::AsyncIoStream> tlsLike(kj::Own<kj::AsyncIoStream> inner);
// Wraps a stream the way kj's TLS stream behaves where it matters to sockfetch: it exposes the
// inner descriptor (whose bytes are not its bytes), reads ahead into a buffer of its own, and
// reports each read two events after the inner read that got its bytes.

kj::String webSocketAccept(kj::StringPtr key);
// The Sec-WebSocket-Accept value for a Sec-WebSocket-Key (RFC 6455), for scripted handshakes.

class ScriptedServer {
  // A loopback HTTP/1.1 server whose every answer is scripted by the test, serving many
  // connections at once. It checks that clients never pipeline: a byte that arrives while a
  // response is being prepared, or beyond the end of a request, is counted in `pipelined`.
public:
  struct Reply {
    kj::String bytes;             // written as is (may be empty)
    kj::Duration delay = 0 * kj::MILLISECONDS;  // before writing
    bool closeAfter = false;      // close the connection after writing
    kj::String thenUnsolicited;   // written a little after the reply, while idle
  };
  using Handler = kj::Function<Reply(unsigned connection, unsigned request, kj::StringPtr text)>;
  // `connection` counts from 0 in accept order; `request` from 0 on that connection; `text` is
  // the request head and body.

  ScriptedServer(kj::AsyncIoContext& io, kj::StringPtr address, Handler handler);
  // `address`: "127.0.0.1" (an ephemeral port is chosen) or "unix:/path".
  ~ScriptedServer() noexcept(false);

  kj::Own<kj::NetworkAddress> address();
  // Where clients connect.

  void closeIdleConnections();
  // Closes every connection that is waiting for its next request.

  unsigned accepted = 0;
  unsigned served = 0;
  unsigned pipelined = 0;
  unsigned open = 0;        // connections currently open
  unsigned maxBusy = 0;     // most requests being answered at once
  unsigned busy = 0;

private:
  struct Connection;
  kj::AsyncIoContext& io;
  Handler handler;
  kj::String addressText;
  kj::Own<kj::ConnectionReceiver> listener;
  kj::Vector<Connection*> connections;
  kj::Own<kj::TaskSet::ErrorHandler> errorHandler;
  kj::TaskSet tasks;

  kj::Promise<void> acceptLoop();
  kj::Promise<void> serve(Connection& connection);
};

}  // namespace test
}  // namespace sockfetch
