// A fresh-eyes review of FramedStream and StreamFetcher (framed-stream.c++, stream-fetcher.c++):
// what the guard's bookkeeping does when a promise's continuation never runs (a body read the
// caller cancels after the connection already gave it bytes), what a read with minBytes 0 that
// returns 0 means (not the end, as kj's contract says), and a write that the stream sends itself
// (sendNow()) failing before a byte of the request left (the keep-alive race between the idle
// check and the first write, as the pool's retry sees it).
//
// Everything runs over in-process pipes or loopback TCP (127.0.0.1); every wait is bounded.

#include "pool.h"
#include "stream-fetcher.h"

#include <sockfetch/kj-compat.h>
#include <sockfetch/fetcher-env.h>
#include <sockfetch/test-util.h>

#include <kj/debug.h>
#include <kj/test.h>
#include <errno.h>
#include <sys/socket.h>

namespace sockfetch {
namespace {

using test::contains;
using Env = test::FetcherEnv;
using Kind = StreamFetcher::CloseKind;
using State = StreamFetcher::State;

#define BOTH_TRANSPORTS(name, description) \
  SOCKFETCH_TRANSPORT_PAIR(Env, name, description, "pipe", (false), "tcp", (true))
// Defines one behaviour as two KJ tests: over an in-process pipe and over loopback TCP.

kj::HttpClient::Response headOnly(Env& env, kj::StringPtr head) {
  // A GET whose response head (only) the server sends; returns the response.
  auto req = env.fetcher->request(kj::HttpMethod::GET, "/", env.headers());
  req.body = nullptr;
  env.peer->readRequest();
  env.peer->send(head);
  return env.bounded(kj::mv(req.response));
}

kj::Promise<kj::String> readAllOr(Env& env, kj::AsyncInputStream& body, kj::StringPtr instead) {
  // The rest of `body`, or `instead` if it has not ended within 300 ms.
  return body.readAllText().exclusiveJoin(env.timer.afterDelay(300 * kj::MILLISECONDS)
      .then([instead]() { return kj::str(instead); }));
}

bool nothingArrived(test::Peer& peer) {
  // The server's socket holds no byte from the client (asked of the kernel, consuming nothing,
  // without turning the event loop).
  int fd = KJ_ASSERT_NONNULL(peer.getStream().getFd());
  char c;
  ssize_t n = recv(fd, &c, 1, MSG_PEEK | MSG_DONTWAIT);
  return n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK);
}

// =================================================================================================
// A body read cancelled after it took bytes

BOTH_TRANSPORTS(cancelledReadThenReadOn,
    "a body read cancelled after the connection gave it bytes, then read on: the read fails, "
    "saying so, and bytes sent after the response never become its body") {
  // A body read on a plain socket (or a pipe whose writer waits) completes its read(2) inside
  // tryRead() itself, and the guard learns of the bytes only in the read's continuation, a turn
  // later: cancel the read in between and the 10 body bytes are gone from the connection while
  // the guard still waits for them. Reading on would take the next 10 bytes the server sends
  // (here: bytes after the response) as the body. So a raw read whose continuation never ran
  // makes the next one fail, and the connection is dropped (never reused).
  auto response = headOnly(env, "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n");
  auto body = env.peer->sendLater("0123456789");
  if (env.tcp) {
    env.bounded(kj::mv(body));
    env.settle(5 * kj::MILLISECONDS);  // in the client's kernel buffer
  }
  char buffer[4096];
  {
    auto read = response.body->tryRead(buffer, 1, sizeof(buffer));
  }  // cancelled before its continuation ran
  if (!env.tcp) env.bounded(kj::mv(body));  // the pipe's write completed: the read took it
  auto after = env.peer->sendLater("XXXXXXXXXX");  // after the response: unsolicited
  auto e = env.failureOf(readAllOr(env, *response.body, "(hung)"));
  KJ_EXPECT(e.getType() == kj::Exception::Type::FAILED, e);
  KJ_EXPECT(contains(e.getDescription(), "a read of the response was cancelled, and it may "
      "have taken bytes from the connection"), e);
  KJ_EXPECT(env.fetcher->getState() == State::CLOSED, env.fetcher->getState());
  KJ_EXPECT(contains(env.why(), "a read of the response was cancelled"), env.why());
}

BOTH_TRANSPORTS(cancelledSmallReadThenReadOn,
    "a small body read (through the framer's buffer) cancelled after it took bytes, then read "
    "on: the read fails, and the connection is not reused short of a chunk") {
  // The same through the framer's own buffer (a consumer buffer under 2 KiB is not filled
  // straight from the connection): the cancelled read took a whole chunk that the framer never
  // saw, so the last chunk would complete the response as the framer sees it, the body reading
  // "" instead of "0123456789".
  auto response = headOnly(env, "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n");
  auto body = env.peer->sendLater("a\r\n0123456789\r\n");
  if (env.tcp) {
    env.bounded(kj::mv(body));
    env.settle(5 * kj::MILLISECONDS);
  }
  char buffer[16];
  {
    auto read = response.body->tryRead(buffer, 1, sizeof(buffer));
  }  // cancelled
  if (!env.tcp) env.bounded(kj::mv(body));
  auto end = env.peer->sendLater("0\r\n\r\n");
  auto e = env.failureOf(readAllOr(env, *response.body, "(hung)"));
  KJ_EXPECT(contains(e.getDescription(), "a read of the response was cancelled"), e);
  KJ_EXPECT(env.fetcher->getState() == State::CLOSED, env.fetcher->getState());
}

// =================================================================================================
// Reads with minBytes 0

BOTH_TRANSPORTS(minBytesZeroFixedEnds,
    "a fixed-length body read with minBytes 0 ends the exchange when its last byte is returned") {
  // Pins the behaviour the chunked case below should match: reads of (buffer, 0, 64) return the
  // body, the connection comes back, and a later read returns 0.
  auto response = headOnly(env, "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n");
  auto written = env.peer->sendLater("hello");
  char buffer[64];
  size_t total = 0;
  while (total < 5) {
    size_t n = env.read(*response.body, buffer + total, 0, sizeof(buffer) - total);
    KJ_ASSERT(n > 0, "a read with minBytes 0 returned nothing mid-body", total);
    total += n;
  }
  KJ_EXPECT(kj::str(kj::arrayPtr(buffer, total)) == "hello");
  env.bounded(kj::mv(written));
  KJ_EXPECT(env.fetcher->getState() == State::IDLE, env.why());
  KJ_EXPECT(env.read(*response.body, buffer, 0, sizeof(buffer)) == 0);
  response.body = nullptr;
  KJ_EXPECT(env.fetcher->getState() == State::IDLE, env.why());
  env.roundTrip();
}

BOTH_TRANSPORTS(minBytesZeroChunkedEnd,
    "a chunked body read with minBytes 0: a read that returns 0 is not its end (kj's contract: "
    "fewer than minBytes only at the end), the next read with minBytes 1 is, and the connection "
    "then comes back") {
  // Reads of (buffer, 0, 64) over "5\r\nhello\r\n0\r\n\r\n" return 5, then 0. With minBytes 0,
  // 0 may come mid-body too (nothing ready yet), so neither the caller nor the guard may take it
  // for the end: the exchange is still busy. A read with minBytes 1 then returns 0, which is the
  // end, and the fetcher is idle (the whole response, terminator included, arrived).
  auto response = headOnly(env, "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n");
  auto written = env.peer->sendLater("5\r\nhello\r\n0\r\n\r\n");
  char buffer[64];
  size_t total = 0;
  for (int i = 0; i < 4; i++) {
    size_t n = env.read(*response.body, buffer + total, 0, sizeof(buffer) - total);
    total += n;
    if (n == 0) break;
  }
  KJ_EXPECT(kj::str(kj::arrayPtr(buffer, total)) == "hello");
  env.bounded(kj::mv(written));
  env.settle(5 * kj::MILLISECONDS);
  KJ_EXPECT(env.fetcher->getState() == State::BUSY, env.fetcher->getState());
  KJ_EXPECT(env.read(*response.body, buffer, 1, sizeof(buffer)) == 0);
  KJ_EXPECT(env.fetcher->getState() == State::IDLE, env.why());
  response.body = nullptr;
  KJ_EXPECT(env.fetcher->getState() == State::IDLE, env.why());
  env.roundTrip();
}

// =================================================================================================
// The first write failing before any byte left

KJ_TEST("a request whose first write found the connection reset (nothing sent) does not count "
    "as written: lastExchangeWroteRequest() is false (tcp)") {
  // stream-fetcher.h: lastExchangeWroteRequest() is "whether any byte of the last exchange's
  // request reached the connection". The idle check passes at request(); the server resets the
  // connection before the event loop runs kj-http's first write, whose sendmsg() the kernel
  // refuses (ECONNRESET): nothing of the request was sent, so it may be sent again (next cases).
  Env env(true);
  env.roundTrip("/first");  // a reused connection
  auto req = env.fetcher->request(kj::HttpMethod::POST, "/", env.headers(), uint64_t(5));
  KJ_ASSERT(nothingArrived(*env.peer));  // kj-http writes in a later turn
  test::resetConnection(*env.peer);      // on loopback the RST has arrived when this returns
  auto write = writeAll(*req.body, "hello"_kj.asBytes()).then([]() {}, [](kj::Exception&&) {});
  auto e = env.failureOf(kj::mv(req.response));
  KJ_EXPECT(e.getType() == kj::Exception::Type::DISCONNECTED, e);
  KJ_EXPECT(!env.fetcher->lastExchangeReceivedResponse());
  KJ_EXPECT(!env.fetcher->lastExchangeWroteRequest(), e);
  env.bounded(kj::mv(write));
}

struct PoolOverListener: public test::LoopEnv {
  // A ConnectionPool to a loopback listener whose connections the test accepts and drives.
  kj::Own<kj::ConnectionReceiver> listener;
  kj::Own<kj::NetworkAddress> address;
  unsigned connects = 0;
  kj::Own<ConnectionPool> pool;
  kj::Own<test::Peer> first;

  PoolOverListener() {
    auto& network = io.provider->getNetwork();
    listener = bounded(network.parseAddress("127.0.0.1", 0))->listen();
    address = bounded(network.parseAddress("127.0.0.1", listener->getPort()));
    pool = kj::heap<ConnectionPool>(timer, table, [this]() {
      ++connects;
      return address->connect();
    });
    // One exchange, so that the next request reuses an idle connection.
    auto req = pool->request(kj::HttpMethod::GET, "/first", headers());
    req.body = nullptr;
    first = kj::heap<test::Peer>(ws, bounded(listener->accept()));
    first->readRequest();
    first->send(test::OK_HELLO);
    auto response = bounded(kj::mv(req.response));
    KJ_ASSERT(bounded(response.body->readAllText()) == "hello");
    response.body = nullptr;
    KJ_ASSERT(pool->getIdleCount() == 1);
  }

  kj::Maybe<kj::String> sentAgain(kj::HttpMethod method) {
    // Sends `method` (empty body) on the idle connection, which the server resets before the
    // event loop writes anything; returns what a second connection received, if one was opened
    // and the request reached it (it is then answered), or null if the request failed instead.
    auto req = pool->request(method, "/again", headers(), uint64_t(0));
    req.body = nullptr;
    KJ_ASSERT(nothingArrived(*first));
    test::resetConnection(*first);
    auto accepted = listener->accept().then([](kj::Own<kj::AsyncIoStream>&& s) {
      return kj::Maybe<kj::Own<kj::AsyncIoStream>>(kj::mv(s));
    });
    auto failed = req.response.then([](kj::HttpClient::Response&&) {
      return kj::Maybe<kj::Own<kj::AsyncIoStream>>(nullptr);
    }, [this](kj::Exception&& e) {
      KJ_LOG(INFO, "the request failed instead", e);
      failure = kj::str(e);
      return kj::Maybe<kj::Own<kj::AsyncIoStream>>(nullptr);
    });
    KJ_IF_SOME(stream, bounded(accepted.exclusiveJoin(kj::mv(failed)))) {
      test::Peer second(ws, kj::mv(stream));
      auto text = second.readRequest();
      return kj::mv(text);
    }
    return nullptr;
  }

  kj::String failure = kj::str("(no failure)");  // why the request failed, if it did
};

KJ_TEST("a DELETE sent on a reused connection that the server reset before its first byte "
    "went out is sent again on a new connection (tcp)") {
  // Pins the pool's stale keep-alive retry in the window between the idle check (passed) and
  // the first write (refused by the kernel): an idempotent request goes out again, once.
  PoolOverListener env;
  auto again = env.sentAgain(kj::HttpMethod::DELETE);
  KJ_IF_SOME(text, again) {
    KJ_EXPECT(text.startsWith("DELETE /again HTTP/1.1\r\n"), text);
  } else {
    KJ_FAIL_EXPECT("the DELETE was not sent again", env.failure);
  }
  KJ_EXPECT(env.connects == 2 && env.pool->getStats().retries == 1, env.connects);
}

KJ_TEST("a POST the pool sent on a reused connection that the server reset before its first "
    "byte went out is sent again on a new connection, once (tcp)") {
  // DESIGN.md: a request that fails on a reused connection before any response byte is retried
  // once on a fresh connection when it is replayable (a body the pool holds: here, empty); a
  // non-idempotent one only if nothing of it was written, which is the case here (the kernel
  // refused the first sendmsg(): see the case above).
  PoolOverListener env;
  auto again = env.sentAgain(kj::HttpMethod::POST);
  KJ_IF_SOME(text, again) {
    KJ_EXPECT(text.startsWith("POST /again HTTP/1.1\r\n"), text);
  } else {
    KJ_FAIL_EXPECT("a POST that never left was not sent again", env.failure);
  }
  KJ_EXPECT(env.connects == 2 && env.pool->getStats().retries == 1, env.connects);
}

}  // namespace
}  // namespace sockfetch
