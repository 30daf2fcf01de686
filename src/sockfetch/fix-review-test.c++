// A second, adversarial review of the fixes of f5d859d (FramedStream's outstanding-raw-read mark,
// sendNow()'s accounting of a refused first write, ConnectionPool's acquire() serving waiters
// first), each suspicion proved or refuted with a scripted peer over an in-process pipe or real
// loopback TCP (127.0.0.1). Covered here and nowhere else:
//  - a read the caller gives up on while no byte had come (a WebSocket receive() or a body read
//    raced against a timer), then reads on: a WebSocket's reads are kj's own, a body's fail;
//  - a request whose first writes reached the server and whose later write the kernel refuses:
//    it counts as written, so it is never sent twice;
//  - a stale-connection retry with one connection allowed while another request waits for it.
//
// Every wait is bounded (LoopEnv::limit).

#include "pool.h"
#include "stream-fetcher.h"

#include <sockfetch/kj-compat.h>
#include <sockfetch/fetcher-env.h>
#include <sockfetch/pipe-pool-env.h>
#include <sockfetch/test-util.h>

#include <kj/debug.h>
#include <kj/test.h>
#include <string.h>

namespace sockfetch {
namespace {

using test::contains;
using Env = test::FetcherEnv;
using State = StreamFetcher::State;

#define BOTH_TRANSPORTS(name, description) \
  SOCKFETCH_TRANSPORT_PAIR(Env, name, description, "pipe", (false), "tcp", (true))
// Defines one behaviour as two KJ tests: over an in-process pipe and over loopback TCP.

kj::String handshakeFor(kj::StringPtr head) {
  // The 101 that accepts the WebSocket handshake `head`.
  auto keyStart = strstr(head.cStr(), "Sec-WebSocket-Key: ");
  KJ_ASSERT(keyStart != nullptr, head);
  keyStart += strlen("Sec-WebSocket-Key: ");
  auto key = kj::heapString(keyStart, strchr(keyStart, '\r') - keyStart);
  return kj::str("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
      "Connection: Upgrade\r\nSec-WebSocket-Accept: ", test::webSocketAccept(key), "\r\n\r\n");
}

template <typename T>
bool timedOut(Env& env, kj::Promise<T> promise) {
  // Races `promise` against a 10 ms timer; true if the timer won (`promise` is then cancelled).
  return env.bounded(promise.then([](T&&) { return false; })
      .exclusiveJoin(env.timer.afterDelay(10 * kj::MILLISECONDS).then([]() { return true; })));
}

// =================================================================================================
// Reads given up on before any byte came

BOTH_TRANSPORTS(webSocketReceiveTimedOut,
    "a WebSocket receive() given up on while no frame had come may be called again: the next "
    "gets the frame the server sends after") {
  // A receive() raced against a timer (an application's keep-alive ping, an idle check) is
  // ordinary kj usage. After a 101 there is no response to frame, and the WebSocket's reads are
  // kj's own: a read still waiting, cancelled, took nothing, and the next receive() works.
  auto promise = env.fetcher->openWebSocket("/ws", env.headers());
  auto handshake = handshakeFor(env.peer->readHead());  // outlives the write
  auto written = env.peer->sendLater(handshake);
  auto response = env.bounded(kj::mv(promise));
  KJ_ASSERT(response.statusCode == 101);
  env.bounded(kj::mv(written));
  auto& socket = *KJ_ASSERT_NONNULL(response.webSocketOrBody.tryGet<kj::Own<kj::WebSocket>>());
  KJ_ASSERT(timedOut(env, socket.receive()), "a frame came though none was sent");

  auto frame = env.peer->sendLater("\x81\x03hey").eagerlyEvaluate([](kj::Exception&&) {});
  auto got = env.bounded(socket.receive().then([](kj::WebSocket::Message&& m) {
    return kj::str(KJ_ASSERT_NONNULL(m.tryGet<kj::String>()));
  }, [](kj::Exception&& e) { return kj::str("failed: ", e.getDescription()); }));
  KJ_EXPECT(got == "hey", got);
}

BOTH_TRANSPORTS(bodyReadTimedOut,
    "a body read given up on, even while no byte had come, makes the next read fail saying so, "
    "and the connection is dropped") {
  // stream-fetcher.h: a cancelled read may have taken bytes from the connection (kj's streams
  // read as soon as bytes are there, before the continuation that would count them runs), and
  // whether it did cannot be told; so reading on fails rather than risk taking the wrong bytes,
  // and the connection is never reused. Here the read took nothing (the server had sent no body
  // yet): the behaviour is the same, by design. (A read kept running for the next to adopt would
  // tell the two apart; see FramedStream::rawReadOutstanding.)
  auto req = env.fetcher->request(kj::HttpMethod::GET, "/", env.headers());
  req.body = nullptr;
  env.peer->readRequest();
  env.peer->send("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n");
  auto response = env.bounded(kj::mv(req.response));
  char buffer[4096];
  KJ_ASSERT(timedOut(env, response.body->tryRead(buffer, 1, sizeof(buffer))),
      "a body byte came though none was sent");

  auto rest = env.peer->sendLater("hello").eagerlyEvaluate([](kj::Exception&&) {});
  auto got = env.bounded(response.body->readAllText().then([](kj::String s) { return kj::mv(s); },
      [](kj::Exception&& e) { return kj::str("failed: ", e.getDescription()); }));
  KJ_EXPECT(got.startsWith("failed: a read of the response was cancelled, and it may have taken "
      "bytes from the connection"), got);
  response.body = nullptr;
  KJ_EXPECT(env.fetcher->getState() == State::CLOSED, env.fetcher->getState());
}

BOTH_TRANSPORTS(smallBodyReadTimedOut,
    "a small body read (through the framer's buffer) given up on while no byte had come makes "
    "the next read fail too") {
  // The same through the framer's own buffer (a consumer buffer under 2 KiB) and a chunked
  // body, as kj::AsyncInputStream::readAllText() or a line reader would read it.
  auto req = env.fetcher->request(kj::HttpMethod::GET, "/", env.headers());
  req.body = nullptr;
  env.peer->readRequest();
  env.peer->send("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n");
  auto response = env.bounded(kj::mv(req.response));
  char buffer[16];
  KJ_ASSERT(timedOut(env, response.body->tryRead(buffer, 1, sizeof(buffer))),
      "a body byte came though none was sent");

  auto rest = env.peer->sendLater("5\r\nhello\r\n0\r\n\r\n")
      .eagerlyEvaluate([](kj::Exception&&) {});
  auto got = env.bounded(response.body->readAllText().then([](kj::String s) { return kj::mv(s); },
      [](kj::Exception&& e) { return kj::str("failed: ", e.getDescription()); }));
  KJ_EXPECT(got.startsWith("failed: a read of the response was cancelled"), got);
  response.body = nullptr;
  KJ_EXPECT(env.fetcher->getState() == State::CLOSED, env.fetcher->getState());
}

// =================================================================================================
// sendNow(): a refused write after earlier ones reached the server

KJ_TEST("a POST whose head and first body bytes reached the server, and whose next write the "
    "kernel refuses (reset), counts as written: lastExchangeWroteRequest() is true (tcp)") {
  // FramedStream::sendNow() counts a refused sendmsg() as "in flight" only after a write of the
  // exchange completed. Here the head and 2 body bytes went out (the server read them), the
  // server resets, and the last 3 bytes are refused: the request reached the server in part, so
  // a pool must never send it again.
  Env env(true);
  env.roundTrip("/first");
  auto req = env.fetcher->request(kj::HttpMethod::POST, "/post", env.headers(), uint64_t(5));
  env.bounded(req.body->write("he", 2));
  auto head = env.peer->readHead();
  KJ_EXPECT(head.startsWith("POST /post HTTP/1.1\r\n"), head);
  KJ_EXPECT(env.peer->readExactly(2) == "he");
  test::resetConnection(*env.peer);
  env.settle(5 * kj::MILLISECONDS);
  auto write = req.body->write("llo", 3).then([]() { return kj::str("written"); },
      [](kj::Exception&& e) { return kj::str("failed: ", e.getDescription()); });
  auto e = env.failureOf(kj::mv(req.response));
  KJ_EXPECT(e.getType() == kj::Exception::Type::DISCONNECTED, e);
  KJ_EXPECT(env.fetcher->lastExchangeWroteRequest(), "bytes that reached the server were not "
      "counted as written, so the request could be sent twice");
  KJ_EXPECT(!env.fetcher->lastExchangeReceivedResponse());
  KJ_EXPECT(env.bounded(kj::mv(write)).startsWith("failed: "));
  KJ_EXPECT(env.fetcher->getState() == State::CLOSED, env.fetcher->getState());
}

// =================================================================================================
// acquire(): a retry with one connection allowed while another request waits

using Reply = test::ScriptedServer::Reply;

KJ_TEST("pool: with maxConnections 1, a GET whose reused connection the server closes while "
    "another request waits is sent again once, after the waiting one, and both succeed (tcp)") {
  // acquire() now serves waiting requests before a newcomer, a retry included: the connection
  // the failure frees goes to the waiting request, and the retry (which must not reuse) waits
  // for the place and gets a fresh connection. Neither may starve, fail OVERLOADED, or be sent
  // twice.
  test::LoopEnv env;
  kj::Vector<kj::String> seen;  // "connection request-line", in the order the server read them
  test::ScriptedServer server(env.io, "127.0.0.1",
      [&](unsigned connection, unsigned request, kj::StringPtr text) {
    seen.add(kj::str(connection, " ", text.slice(0, text.findFirst('\r').orDefault(0))));
    if (connection == 0 && request == 1) {
      Reply reply;
      reply.closeAfter = true;  // read the request, then close without a word
      return reply;
    }
    return test::ok("fine");
  });
  auto address = server.address();
  ConnectionPool::Settings settings;
  settings.maxConnections = 1;
  settings.maxWaiting = 4;
  ConnectionPool pool(env.timer, env.table, [&]() { return address->connect(); }, settings);
  auto get = [&](kj::StringPtr path) {
    auto h = env.headers();
    auto r = pool.request(kj::HttpMethod::GET, path, h);
    r.body = nullptr;
    return r.response.then([](kj::HttpClient::Response&& response) {
      return response.body->readAllText().attach(kj::mv(response.body));
    }, [](kj::Exception&& e) { return kj::str("failed: ", e.getDescription()); })
        .eagerlyEvaluate(nullptr);
  };
  KJ_ASSERT(env.bounded(get("/warm")) == "fine");
  auto a = get("/a");  // on the reused connection, which the server closes
  auto b = get("/b");  // waits for the only place
  KJ_EXPECT(env.bounded(kj::mv(a)) == "fine");
  KJ_EXPECT(env.bounded(kj::mv(b)) == "fine");
  auto& s = pool.getStats();
  KJ_EXPECT(s.retries == 1 && s.overloaded == 0, s.retries, s.overloaded);
  KJ_ASSERT(seen.size() == 4, seen.size());
  KJ_EXPECT(seen[1].startsWith("0 GET /a "), seen[1]);
  KJ_EXPECT(seen[2].startsWith("1 GET /b "), "the waiting request did not go first", seen[2]);
  KJ_EXPECT(seen[3].startsWith("2 GET /a "), "the retry did not go on a fresh connection",
      seen[3]);
  KJ_EXPECT(pool.getWaitingCount() == 0);
  env.settle();
  KJ_EXPECT(pool.getOpenCount() <= 1, pool.getOpenCount());
}

}  // namespace
}  // namespace sockfetch
