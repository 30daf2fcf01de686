// A second review of the fixes of 0555b9f..bf07e73, each suspicion proved or refuted with the
// framer driven directly, or a ConnectionPool over in-process pipes (the test holds the server
// ends) or loopback TCP (127.0.0.1). Covered here and nowhere else:
//  - ResponseFramer's chunk-size rewrite with one gap closed per parse(): generated chunked
//    responses (extensions, leading zeros, blanks, bare LF line ends, trailers, interim 1xx
//    responses before them, a second response's bytes after them) fed in random reads with take()
//    of random sizes between them, compared with what the rewrite must give; a malformed line
//    after rewritten ones in the same read passes on only what preceded it, rewritten;
//  - an idle connection the server closed, found as a request is about to go out on it, on a
//    stream whose kernel cannot be asked (a pipe, as a TLS stream is): the request goes out on
//    another connection as on a plain socket, a streamed body included, and no retry is spent;
//  - the same on loopback TCP, for a streamed POST and a WebSocket handshake made in the turn the
//    server closed the connection: replaced, sent once, not counted as a retry (past several
//    lost connections in a row); and for an idle connection that never carried a request (opened
//    for a request that gave up);
//  - whenWriteDisconnected() of a pooled streamed body waiting for a connection when the pool is
//    destroyed, when the connect is refused, when the body is dropped, and kept past the body,
//    the response and the pool;
//  - a request body write kept in flight past the body and the StreamFetcher, or the pool.
// Every wait is bounded.
#include "pool.h"
#include "response-framer.h"
#include "stream-fetcher.h"
#include <sockfetch/fetcher-env.h>
#include <sockfetch/kj-compat.h>
#include <sockfetch/test-util.h>
#include <kj/debug.h>
#include <kj/test.h>
#include <kj/vector.h>
#include <string.h>

namespace sockfetch {
namespace {

using test::OK_HELLO;
using test::Peer;

// =================================================================================================
// ResponseFramer: chunk-size lines rewritten, the gap closed once per parse()

struct Generated {
  kj::String input;     // what the server sends
  kj::String passes;    // what the framer must pass on (interim responses gone, lines rewritten)
  kj::String residue;   // bytes after the response
};

kj::String chunkLine(test::Rng& rng, size_t size, kj::Vector<char>& expected) {
  // A chunk-size line for `size`, dressed up as a server may; appends its rewrite to `expected`.
  static const char* const BLANKS[] = {"", "", " ", "\t", "  \t"};
  static const char* const EXTS[] = {"", "", ";a=1", ";name=\"q;x\"", " ; e", ";a;b=2;c=\"\""};
  auto hex = kj::str(kj::hex(uint64_t(size)));
  if (rng.chance(50)) {
    for (auto& c: hex) if (c >= 'a' && c <= 'f') c = c - 'a' + 'A';
  }
  auto zeros = kj::heapString(rng.chance(40) ? rng.below(40) : 0);
  for (auto& c: zeros) c = '0';
  auto eol = rng.chance(20) ? "\n"_kj : "\r\n"_kj;
  auto line = kj::str(rng.pick(BLANKS), zeros, hex, rng.pick(BLANKS), rng.pick(EXTS),
      rng.pick(BLANKS), eol);
  expected.addAll(hex);
  expected.addAll(eol);
  return line;
}

Generated generate(uint64_t seed) {
  test::Rng rng(seed);
  kj::Vector<char> input;
  kj::Vector<char> passes;
  if (rng.chance(30)) input.addAll("HTTP/1.1 100 Continue\r\n\r\n"_kj);
  if (rng.chance(20)) input.addAll("HTTP/1.1 103 Early Hints\r\nLink: </s>\r\n\r\n"_kj);
  kj::StringPtr head = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
  input.addAll(head);
  passes.addAll(head);
  unsigned chunks = rng.below(8);
  for (unsigned i = 0; i < chunks; i++) {
    size_t size = rng.chance(10) ? 200 + rng.below(3000) : 1 + rng.below(40);
    input.addAll(chunkLine(rng, size, passes));
    for (size_t j = 0; j < size; j++) {
      char c = 'a' + rng.below(26);
      input.add(c);
      passes.add(c);
    }
    auto end = rng.chance(10) ? "\n"_kj : "\r\n"_kj;
    input.addAll(end);
    passes.addAll(end);
  }
  input.addAll(chunkLine(rng, 0, passes));
  unsigned trailers = rng.below(3);
  for (unsigned i = 0; i < trailers; i++) input.addAll(kj::str("X-T", i, ": v", i, "\r\n"));
  input.addAll("\r\n"_kj);
  kj::String residue = kj::str(rng.chance(40)
      ? "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi"_kj : ""_kj);
  input.addAll(residue);
  return {kj::heapString(input.asPtr()), kj::heapString(passes.asPtr()), kj::mv(residue)};
}

struct Fed {
  kj::String passed;
  bool complete = false;
  kj::Maybe<kj::String> failure;
  kj::String rest;  // takeAll() after finish(), once complete
};

Fed feed(kj::StringPtr input, test::Rng& rng, unsigned mode) {
  // mode 0: whole; 1: a byte per read; 2: random reads. take() of random sizes between reads.
  ResponseFramer framer;
  framer.start(kj::HttpMethod::GET);
  kj::Vector<char> passed;
  Fed fed;
  auto takeSome = [&]() {
    char out[512];
    for (;;) {
      size_t room = 1 + rng.below(sizeof(out));
      size_t n = framer.take(kj::arrayPtr(reinterpret_cast<kj::byte*>(out), room));
      if (n == 0) break;
      passed.addAll(out, out + n);
      if (rng.chance(30)) break;  // leave some for after the next read
    }
  };
  size_t pos = 0;
  while (pos < input.size() && fed.failure == nullptr) {
    size_t want = mode == 0 ? input.size() - pos : mode == 1 ? 1 : 1 + rng.below(700);
    want = kj::min(want, input.size() - pos);
    while (want > 0) {
      auto space = framer.space();
      size_t n = kj::min(want, space.size());
      memcpy(space.begin(), input.begin() + pos, n);
      framer.received(n);
      pos += n;
      want -= n;
      KJ_IF_SOME(e, framer.getFailure()) {
        fed.failure = kj::str(e.getDescription());
        break;
      }
    }
    takeSome();
  }
  for (;;) {
    char out[512];
    size_t got = framer.take(kj::arrayPtr(reinterpret_cast<kj::byte*>(out), sizeof(out)));
    if (got == 0) break;
    passed.addAll(out, out + got);
  }
  fed.passed = kj::heapString(passed.asPtr());
  fed.complete = framer.isComplete();
  if (fed.complete) {
    framer.finish();
    auto rest = framer.takeAll();
    fed.rest = kj::heapString(reinterpret_cast<const char*>(rest.begin()), rest.size());
  }
  return fed;
}

KJ_TEST("framer: generated chunked responses (extensions, leading zeros, blanks, LF line ends, "
    "trailers, interim 1xx, residue) in random reads, take() between them: rewritten exactly") {
  // Contract (response-framer.h, keepOnly()/closeGap()): however the reads fall and however
  // much the owner takes between them, the framer passes on the final response with each
  // chunk-size line reduced to its significant digits and its line end, the data and the CRLFs
  // after it untouched, no trailer and no byte of what follows; the response completes, and what
  // follows it is kept, whole and in order, for whoever owns the stream next (takeAll()).
  unsigned checked = 0;
  for (uint64_t seed = 1; seed <= 300; seed++) {
    auto g = generate(seed);
    for (unsigned mode = 0; mode < 3; mode++) {
      test::Rng rng(seed * 7 + mode);
      auto fed = feed(g.input, rng, mode);
      KJ_IF_SOME(f, fed.failure) {
        KJ_FAIL_EXPECT("a well-formed response failed", seed, mode, f);
        continue;
      }
      KJ_EXPECT(fed.complete, seed, mode);
      KJ_EXPECT(fed.passed == g.passes, seed, mode, fed.passed.size(), g.passes.size());
      KJ_EXPECT(fed.rest == g.residue, seed, mode, fed.rest, g.residue);
      ++checked;
    }
  }
  KJ_EXPECT(checked == 900, checked);
}

KJ_TEST("framer: a malformed chunk-size line after rewritten ones, in the same read: only what "
    "preceded it is passed on, rewritten, and the response fails") {
  // Contract: "Nothing after the point of failure is ever passed on" (getFailure()); the lines
  // rewritten earlier in that parse() (the gap closed as parse() unwinds) read as they should.
  kj::StringPtr head = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
  auto input = kj::str(head, "0003;a=1\r\nabc\r\n  4 ;b\r\nwxyz\r\n5x\r\nvwxyz\r\n0\r\n\r\n");
  auto good = kj::str(head, "3\r\nabc\r\n4\r\nwxyz\r\n");
  for (unsigned mode = 0; mode < 3; mode++) {
    test::Rng rng(mode + 11);
    auto fed = feed(input, rng, mode);
    KJ_EXPECT(fed.failure != nullptr, mode);
    // (All that precedes the bad line is passable before it is parsed.)
    KJ_EXPECT(fed.passed == good, mode, fed.passed);
  }
}

// =================================================================================================
// An idle connection found closed as a request is about to go out on it, over pipes

struct PipeEnv: public test::PipeProxyEnv {
  // A ConnectionPool whose every connection is an in-process pipe; the server ends are the
  // Peers in `proxies`, in connect order.
  kj::Own<ConnectionPool> pool;
  explicit PipeEnv(ConnectionPool::Settings settings = {}) {
    pool = kj::heap<ConnectionPool>(timer, table, toProxy(), kj::mv(settings));
  }
  void turns(unsigned n) {
    for (unsigned i = 0; i < n; i++) kj::evalLater([]() {}).wait(ws);
  }
  void getOn(size_t peer, kj::StringPtr url) {
    auto req = pool->request(kj::HttpMethod::GET, url, headers());
    req.body = nullptr;
    waitFor([&]() { return proxies.size() > peer; });
    KJ_ASSERT(proxies.size() > peer);
    auto& p = *proxies[peer];
    auto head = p.readRequest();
    KJ_EXPECT(head.startsWith(kj::str("GET ", url, " HTTP/1.1\r\n")), head);
    auto written = p.sendLater(OK_HELLO);
    auto r = bounded(kj::mv(req.response));
    KJ_EXPECT(bounded(r.body->readAllText()) == "hello");
    bounded(kj::mv(written));
    turns(5);
  }
};

KJ_TEST("over a pipe (a stream the kernel cannot be asked about, as TLS), a GET on an idle "
    "connection the server has just closed goes elsewhere without spending a retry") {
  // Contract (pool.h): a connection found closed while idle as a request is about to go out on
  // it (before anything is written) is no failure: the request takes another connection, which
  // is not counted as a retry (stats.retries == 0), as on a plain socket. On a pipe the loss is
  // found by the write gate (FramedStream::failGate(), some turns later, nothing written yet)
  // and reaches the pool as the response's failure, not as fetcher.request()'s refusal.
  PipeEnv env;
  env.getOn(0, "/a");
  KJ_ASSERT(env.pool->getIdleCount() == 1);
  env.proxies[0]->close();  // the server closes the idle connection; nobody has noticed yet
  auto req = env.pool->request(kj::HttpMethod::GET, "/b", env.headers());
  req.body = nullptr;
  auto response = req.response.eagerlyEvaluate(nullptr);
  env.waitFor([&]() { return env.proxies.size() == 2; });
  KJ_ASSERT(env.proxies.size() == 2, "the GET was not sent on a new connection");
  auto head = env.proxies[1]->readRequest();
  KJ_EXPECT(head.startsWith("GET /b HTTP/1.1\r\n"), head);
  auto written = env.proxies[1]->sendLater(OK_HELLO);
  auto r = env.bounded(kj::mv(response));
  KJ_EXPECT(env.bounded(r.body->readAllText()) == "hello");
  env.bounded(kj::mv(written));
  auto& s = env.pool->getStats();
  KJ_EXPECT(s.droppedPeerClosedIdle == 1, s.droppedPeerClosedIdle, s.droppedStale, s.dropped());
  KJ_EXPECT(s.retries == 0, "an idle connection found closed before anything was written spent "
      "the request's retry", s.retries);
}

KJ_TEST("over a pipe (as TLS), a streamed POST on an idle connection the server has just closed "
    "goes elsewhere with its whole body, as on a plain socket") {
  // Contract (pool.h): as above. The POST's body (no expectedBodySize: streamed) is written by
  // the caller only after the loss was found: the body, handed to the lost connection's exchange
  // at once but never written to, is taken back, and the request goes out once, whole, on a new
  // connection, as it does over loopback TCP (see the TCP case below).
  ConnectionPool::Settings settings;
  settings.maxReplayBodyBytes = 0;
  PipeEnv env(kj::mv(settings));
  env.getOn(0, "/a");
  KJ_ASSERT(env.pool->getIdleCount() == 1);
  env.proxies[0]->close();
  auto req = env.pool->request(kj::HttpMethod::POST, "/up", env.headers());
  auto response = req.response.then([](kj::HttpClient::Response&& r) -> kj::Maybe<unsigned> {
    return r.statusCode;
  }, [](kj::Exception&& e) -> kj::Maybe<unsigned> {
    KJ_LOG(WARNING, "the streamed POST failed", e.getDescription());
    return nullptr;
  }).eagerlyEvaluate(nullptr);
  env.turns(20);  // the loss is found; nothing of the body was written yet
  auto write = writeAll(*req.body, "hello"_kj.asBytes()).then([]() -> kj::Maybe<kj::String> {
    return nullptr;
  }, [](kj::Exception&& e) -> kj::Maybe<kj::String> {
    return kj::str(e.getDescription());
  }).eagerlyEvaluate(nullptr);
  env.waitFor([&]() { return env.proxies.size() == 2 || write.poll(env.ws); });
  if (env.proxies.size() == 2) {
    auto head = env.proxies[1]->readHead();
    KJ_EXPECT(head.startsWith("POST /up HTTP/1.1\r\n"), head);
    KJ_EXPECT(env.proxies[1]->readExactly(10) == "5\r\nhello\r\n");
  }
  KJ_IF_SOME(failure, env.bounded(kj::mv(write))) {
    KJ_FAIL_EXPECT("the body's write failed", failure);
  }
  req.body = nullptr;
  if (env.proxies.size() == 2) {
    KJ_EXPECT(env.proxies[1]->readExactly(5) == "0\r\n\r\n");
    auto written = env.proxies[1]->sendLater(OK_HELLO);
    env.bounded(kj::mv(written));
  }
  auto status = env.bounded(kj::mv(response));
  KJ_EXPECT(status == 200u, "the POST was not carried by another connection",
      env.proxies.size());
}

KJ_TEST("over a pipe (as TLS), a streamed POST whose body was written to before the loss of its "
    "idle connection was found is not sent elsewhere: its write and its response fail, and no "
    "connection carries it without that write") {
  // Contract: a request goes on another connection only as it is. A write that went to the lost
  // connection's exchange was failed, and its caller told so; sending the request elsewhere
  // would then carry a body without those bytes (a chunked POST ended without them, when the
  // caller drops the body it thinks failed). So the request fails (DISCONNECTED, nothing of it
  // written) and no other connection is opened for it.
  ConnectionPool::Settings settings;
  settings.maxReplayBodyBytes = 0;
  PipeEnv env(kj::mv(settings));
  env.getOn(0, "/a");
  KJ_ASSERT(env.pool->getIdleCount() == 1);
  env.proxies[0]->close();
  auto req = env.pool->request(kj::HttpMethod::POST, "/up", env.headers());
  auto response = req.response.then([](kj::HttpClient::Response&& r) -> kj::Maybe<kj::String> {
    return kj::str("status ", r.statusCode);
  }, [](kj::Exception&& e) -> kj::Maybe<kj::String> {
    KJ_EXPECT(e.getType() == kj::Exception::Type::DISCONNECTED, e);
    return nullptr;
  }).eagerlyEvaluate(nullptr);
  auto write = writeAll(*req.body, "hello"_kj.asBytes()).then([]() { return true; },
      [](kj::Exception&&) { return false; }).eagerlyEvaluate(nullptr);
  env.turns(20);  // the loss is found, after the write went to the lost connection's exchange
  KJ_EXPECT(!env.bounded(kj::mv(write)), "a write to a lost connection succeeded");
  req.body = nullptr;
  KJ_IF_SOME(status, env.bounded(kj::mv(response))) {
    KJ_FAIL_EXPECT("the POST was answered without the bytes of its failed write", status);
  }
  env.turns(20);
  KJ_EXPECT(env.proxies.size() == 1, "another connection was opened for the POST",
      env.proxies.size());
}

// =================================================================================================
// The same over loopback TCP, where the fetcher's request() finds the loss at once

struct TcpEnv: public test::LoopEnv {
  kj::Own<kj::ConnectionReceiver> listener;
  kj::Own<kj::NetworkAddress> address;
  kj::Own<ConnectionPool> pool;

  explicit TcpEnv(ConnectionPool::Settings settings = {}) {
    auto& network = io.provider->getNetwork();
    listener = network.parseAddress("127.0.0.1", 0).wait(ws)->listen();
    address = network.parseAddress("127.0.0.1", listener->getPort()).wait(ws);
    pool = kj::heap<ConnectionPool>(timer, table, *address, kj::mv(settings));
  }
  kj::Own<Peer> accept() { return kj::heap<Peer>(ws, bounded(listener->accept())); }
  bool noNewConnection() {
    return listener->accept().then([](auto&&) { return false; })
        .exclusiveJoin(timer.afterDelay(50 * kj::MILLISECONDS).then([]() { return true; }))
        .wait(ws);
  }
  kj::Own<Peer> firstGet() {
    auto req = pool->request(kj::HttpMethod::GET, "/a", headers());
    req.body = nullptr;
    auto peer = accept();
    auto head = peer->readRequest();
    KJ_EXPECT(head.startsWith("GET /a HTTP/1.1\r\n"), head);
    auto written = peer->sendLater(OK_HELLO);
    auto r = bounded(kj::mv(req.response));
    KJ_EXPECT(bounded(r.body->readAllText()) == "hello");
    bounded(kj::mv(written));
    settle(5 * kj::MILLISECONDS);
    KJ_EXPECT(pool->getIdleCount() == 1);
    return peer;
  }
};

KJ_TEST("TCP: a streamed POST made in the turn the server closed its idle connection goes out "
    "once, whole, on a new connection; no retry spent; whenWriteDisconnected() follows it") {
  // Contract (bf07e73): the loss is found by request() (MSG_PEEK) before anything is written,
  // so the request, streamed body included, takes another connection: sent once, neither
  // counted as a retry nor failing; the drop is counted as the server closing an idle one. A
  // whenWriteDisconnected() asked before any connection took the body does not settle while the
  // new connection carries it.
  ConnectionPool::Settings settings;
  settings.maxReplayBodyBytes = 0;
  TcpEnv env(kj::mv(settings));
  auto peer0 = env.firstGet();
  peer0 = nullptr;  // close(): the FIN is in the client's socket before the next line runs
  auto req = env.pool->request(kj::HttpMethod::POST, "/up", env.headers());
  auto disconnected = req.body->whenWriteDisconnected().then([]() { return true; },
      [](kj::Exception&&) { return true; }).eagerlyEvaluate(nullptr);
  auto response = req.response.eagerlyEvaluate(nullptr);
  auto peer1 = env.accept();
  auto write = writeAll(*req.body, "hello"_kj.asBytes());
  auto head = peer1->readHead();
  KJ_EXPECT(head.startsWith("POST /up HTTP/1.1\r\n"), head);
  KJ_EXPECT(peer1->readExactly(10) == "5\r\nhello\r\n");
  env.bounded(kj::mv(write));
  KJ_EXPECT(!disconnected.poll(env.ws), "whenWriteDisconnected() settled on a live connection");
  req.body = nullptr;
  KJ_EXPECT(peer1->readExactly(5) == "0\r\n\r\n");
  auto written = peer1->sendLater(OK_HELLO);
  auto r = env.bounded(kj::mv(response));
  KJ_EXPECT(env.bounded(r.body->readAllText()) == "hello");
  env.bounded(kj::mv(written));
  KJ_EXPECT(env.noNewConnection());
  auto& s = env.pool->getStats();
  KJ_EXPECT(s.retries == 0 && s.droppedPeerClosedIdle == 1 && s.connectionsOpened == 2,
      s.retries, s.droppedPeerClosedIdle, s.connectionsOpened, s.dropped());
}

KJ_TEST("TCP: a streamed POST whose idle connection the server closes right after request() "
    "returned, before its first byte went out, goes out whole on a new connection") {
  // Contract (pool.h): as above, a connection found closed while idle as a request is about to go
  // out on it, nothing written, is replaced. On a plain socket the FIN may land after
  // fetcher.request()'s MSG_PEEK and before the write gate's check one turn later (the usual race
  // of a server's keep-alive timeout); here the test closes the server's end in that window. The
  // POST goes out once, whole, on a new connection (as when the FIN came a moment earlier, see
  // the case above).
  ConnectionPool::Settings settings;
  settings.maxReplayBodyBytes = 0;
  TcpEnv env(kj::mv(settings));
  auto peer0 = env.firstGet();
  auto req = env.pool->request(kj::HttpMethod::POST, "/up", env.headers());
  peer0 = nullptr;  // after request() took the connection, before any byte was written
  auto response = req.response.then([](kj::HttpClient::Response&& r) -> kj::Maybe<unsigned> {
    return r.statusCode;
  }, [](kj::Exception&& e) -> kj::Maybe<unsigned> {
    KJ_LOG(WARNING, "the streamed POST failed", e.getDescription());
    return nullptr;
  }).eagerlyEvaluate(nullptr);
  env.settle(5 * kj::MILLISECONDS);  // the gate looks; the caller has written nothing yet
  auto write = writeAll(*req.body, "hello"_kj.asBytes()).then([]() -> kj::Maybe<kj::String> {
    return nullptr;
  }, [](kj::Exception&& e) -> kj::Maybe<kj::String> {
    return kj::str(e.getDescription());
  }).eagerlyEvaluate(nullptr);
  auto accepted = env.listener->accept().then([](kj::Own<kj::AsyncIoStream>&& s) {
    return kj::Maybe<kj::Own<kj::AsyncIoStream>>(kj::mv(s));
  }).exclusiveJoin(env.timer.afterDelay(200 * kj::MILLISECONDS).then([]() {
    return kj::Maybe<kj::Own<kj::AsyncIoStream>>(nullptr);
  })).wait(env.ws);
  kj::Maybe<kj::Promise<void>> written;
  KJ_IF_SOME(stream, accepted) {
    Peer peer1(env.ws, kj::mv(stream));
    auto head = peer1.readHead();
    KJ_EXPECT(head.startsWith("POST /up HTTP/1.1\r\n"), head);
    KJ_EXPECT(peer1.readExactly(10) == "5\r\nhello\r\n");
    KJ_IF_SOME(failure, env.bounded(kj::mv(write))) {
      KJ_FAIL_EXPECT("the body's write failed", failure);
    }
    req.body = nullptr;
    KJ_EXPECT(peer1.readExactly(5) == "0\r\n\r\n");
    peer1.send(OK_HELLO);
    auto status = env.bounded(kj::mv(response));
    KJ_EXPECT(status == 200u);
  } else {
    KJ_IF_SOME(failure, env.bounded(kj::mv(write))) {
      KJ_FAIL_EXPECT("the body's write failed", failure);
    }
    req.body = nullptr;
    auto status = env.bounded(kj::mv(response));
    KJ_EXPECT(status == 200u, "the POST was not carried by another connection");
  }
}

KJ_TEST("TCP: a WebSocket handshake made in the turn the server closed its idle connection goes "
    "out once on a new connection; no retry spent") {
  // Contract (bf07e73, WebSocketAttempt::on() -> start(false)): as for a request.
  TcpEnv env;
  auto peer0 = env.firstGet();
  peer0 = nullptr;
  auto promise = env.pool->openWebSocket("/ws", env.headers()).eagerlyEvaluate(nullptr);
  auto peer1 = env.accept();
  auto head = peer1->readHead();
  KJ_EXPECT(head.startsWith("GET /ws HTTP/1.1\r\n"), head);
  kj::StringPtr field = "Sec-WebSocket-Key: ";
  auto at = strstr(head.cStr(), field.cStr());
  KJ_ASSERT(at != nullptr, head);
  auto key = kj::heapString(at + field.size(), strchr(at, '\r') - (at + field.size()));
  auto written = peer1->sendLater(kj::str("HTTP/1.1 101 Switching Protocols\r\n"
      "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ",
      test::webSocketAccept(key), "\r\n\r\n"));
  auto response = env.bounded(kj::mv(promise));
  env.bounded(kj::mv(written));
  KJ_EXPECT(response.statusCode == 101, response.statusCode);
  KJ_EXPECT(response.webSocketOrBody.is<kj::Own<kj::WebSocket>>());
  auto& s = env.pool->getStats();
  KJ_EXPECT(s.retries == 0 && s.droppedPeerClosedIdle == 1 && s.connectionsOpened == 2,
      s.retries, s.droppedPeerClosedIdle, s.connectionsOpened);
  KJ_EXPECT(env.noNewConnection());
}

KJ_TEST("TCP: three idle connections the server closed at once, a GET in that turn: it walks "
    "past all three to a new connection, sent once, no retry spent, each drop counted once") {
  // Contract (bf07e73): each connection found lost leaves the pool, so replacing ends; the
  // request is neither failed nor retried nor sent twice.
  TcpEnv env;
  kj::Vector<kj::Promise<kj::HttpClient::Response>> responses;
  kj::Vector<kj::Own<Peer>> peers;
  for (auto path: {"/a"_kj, "/b"_kj, "/c"_kj}) {
    auto req = env.pool->request(kj::HttpMethod::GET, path, env.headers());
    req.body = nullptr;
    responses.add(req.response.eagerlyEvaluate(nullptr));
    peers.add(env.accept());
    KJ_EXPECT(peers.back()->readRequest().startsWith(kj::str("GET ", path, " HTTP/1.1\r\n")));
  }
  kj::Vector<kj::Promise<void>> writes;
  for (auto& peer: peers) writes.add(peer->sendLater(OK_HELLO));
  for (auto& response: responses) {
    auto r = env.bounded(kj::mv(response));
    KJ_EXPECT(env.bounded(r.body->readAllText()) == "hello");
  }
  for (auto& w: writes) env.bounded(kj::mv(w));
  env.settle(5 * kj::MILLISECONDS);
  KJ_ASSERT(env.pool->getIdleCount() == 3, env.pool->getIdleCount());
  peers.clear();  // all three closed; the GET comes in this very turn
  auto req = env.pool->request(kj::HttpMethod::GET, "/d", env.headers());
  req.body = nullptr;
  auto response = req.response.eagerlyEvaluate(nullptr);
  auto peer = env.accept();
  KJ_EXPECT(peer->readRequest().startsWith("GET /d HTTP/1.1\r\n"));
  auto written = peer->sendLater(OK_HELLO);
  auto r = env.bounded(kj::mv(response));
  KJ_EXPECT(env.bounded(r.body->readAllText()) == "hello");
  env.bounded(kj::mv(written));
  KJ_EXPECT(env.noNewConnection());
  auto& s = env.pool->getStats();
  KJ_EXPECT(s.retries == 0 && s.droppedPeerClosedIdle == 3 && s.connectionsOpened == 4 &&
      s.dropped() == 3, s.retries, s.droppedPeerClosedIdle, s.connectionsOpened, s.dropped());
}

KJ_TEST("TCP: an idle connection that never carried a request (opened for a request that gave "
    "up), closed by the server, found as a GET goes out on it: replaced, not retried") {
  // Contract (pool.h): a connection found closed while idle as a request is about to go out on
  // it is no failure: the request takes another connection, not counted as a retry; the drop
  // counts as an idle connection its server closed (droppedPeerClosedIdle), not as
  // droppedPeerClosedNew ("it may be at a connection limit"). The connection was opened for a
  // waiting request that gave up (connectFor() -> connectionIdle()) and sat idle until its
  // server closed it, as servers close idle keep-alive connections: it sat idle in the pool,
  // whether or not it carried a request.
  ConnectionPool::Settings settings;
  settings.maxConnections = 1;
  TcpEnv env(kj::mv(settings));
  kj::Maybe<kj::ForkedPromise<void>> hold;
  auto& address = *env.address;
  env.pool = kj::heap<ConnectionPool>(env.timer, env.table,
      [&]() -> kj::Promise<kj::Own<kj::AsyncIoStream>> {
    KJ_IF_SOME(h, hold) {
      return h.addBranch().then([&]() { return address.connect(); });
    }
    return address.connect();
  }, settings);
  auto a = env.pool->request(kj::HttpMethod::GET, "/a", env.headers());
  a.body = nullptr;
  auto peer0 = env.accept();
  KJ_EXPECT(peer0->readRequest().startsWith("GET /a HTTP/1.1\r\n"));
  auto b = env.pool->request(kj::HttpMethod::GET, "/b", env.headers());
  b.body = nullptr;
  auto bResponse = kj::mv(b.response);
  env.waitFor([&]() { return env.pool->getWaitingCount() == 1; });
  KJ_ASSERT(env.pool->getWaitingCount() == 1);
  auto paf = kj::newPromiseAndFulfiller<void>();
  hold = paf.promise.fork();
  auto written = peer0->sendLater(
      "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 5\r\n\r\nhello");
  auto r = env.bounded(kj::mv(a.response));
  KJ_EXPECT(env.bounded(r.body->readAllText()) == "hello");
  env.bounded(kj::mv(written));
  r = {};
  env.settle(5 * kj::MILLISECONDS);  // the connect for /b is under way (held)
  bResponse = nullptr;                // /b gives up
  hold = nullptr;
  paf.fulfiller->fulfill();
  auto peer1 = env.accept();
  env.waitFor([&]() { return env.pool->getIdleCount() == 1; });
  KJ_ASSERT(env.pool->getIdleCount() == 1, "the connection opened for /b did not become idle");
  auto& s = env.pool->getStats();
  KJ_ASSERT(s.retries == 0);
  peer1 = nullptr;  // the server closes the idle connection; the GET comes in this very turn
  auto c = env.pool->request(kj::HttpMethod::GET, "/c", env.headers());
  c.body = nullptr;
  auto response = c.response.eagerlyEvaluate(nullptr);
  auto peer2 = env.accept();
  KJ_EXPECT(peer2->readRequest().startsWith("GET /c HTTP/1.1\r\n"));
  auto written2 = peer2->sendLater(OK_HELLO);
  auto rc = env.bounded(kj::mv(response));
  KJ_EXPECT(env.bounded(rc.body->readAllText()) == "hello");
  env.bounded(kj::mv(written2));
  KJ_EXPECT(s.retries == 0, "an idle connection found closed before anything was written spent "
      "the request's retry", s.retries);
  KJ_EXPECT(s.droppedPeerClosedNew == 0 && s.droppedPeerClosedIdle == 1,
      "an idle connection closed by its server was counted as a new one refused",
      s.droppedPeerClosedNew, s.droppedPeerClosedIdle);
}

// =================================================================================================
// whenWriteDisconnected() of a pooled streamed body, and write promises kept past their owners

KJ_TEST("a pooled streamed body waiting for a connection: whenWriteDisconnected() settles when the "
    "pool is destroyed, and a promise of it kept past body, response and pool is safe") {
  // Contract (0555b9f): before a connection took the body, whenWriteDisconnected() "waits for
  // one, and is disconnected if none ever will": the pool going away is such a case. Anything
  // destroyed in any order is memory-safe (the suite runs under ASan).
  ConnectionPool::Settings settings;
  settings.maxConnections = 1;
  settings.maxReplayBodyBytes = 0;
  TcpEnv env(kj::mv(settings));
  auto first = env.pool->request(kj::HttpMethod::GET, "/a", env.headers());
  first.body = nullptr;
  auto firstResponse = first.response.then([](auto&&) {}, [](kj::Exception&&) {})
      .eagerlyEvaluate(nullptr);
  auto peer0 = env.accept();
  peer0->readRequest();
  auto req = env.pool->request(kj::HttpMethod::POST, "/up", env.headers());
  auto response = req.response.then([](auto&&) { return false; },
      [](kj::Exception&&) { return true; }).eagerlyEvaluate(nullptr);
  env.waitFor([&]() { return env.pool->getWaitingCount() == 1; });
  KJ_EXPECT(env.pool->getWaitingCount() == 1);
  auto disconnected = req.body->whenWriteDisconnected().then([]() { return true; },
      [](kj::Exception&&) { return true; }).eagerlyEvaluate(nullptr);
  auto kept = req.body->whenWriteDisconnected();  // never waited on: dropped last
  KJ_EXPECT(!disconnected.poll(env.ws));
  env.pool = nullptr;
  KJ_EXPECT(env.bounded(kj::mv(response)), "the waiting request did not fail");
  KJ_EXPECT(env.bounded(kj::mv(disconnected)));
  req.body = nullptr;
  peer0 = nullptr;
  env.bounded(kj::mv(firstResponse));
  env.settle(5 * kj::MILLISECONDS);
  kept = nullptr;
}

KJ_TEST("a pooled streamed body: whenWriteDisconnected() asked while no connection took it "
    "settles when the request fails to connect, and when the body is dropped") {
  // Contract (0555b9f, Attempt::whenWriteDisconnected()): before a connection took the body it
  // "waits for one, and is disconnected if none ever will": a connect refused (nothing listens)
  // is such a case, and so is the caller dropping the body. Never left pending for ever.
  ConnectionPool::Settings settings;
  settings.maxReplayBodyBytes = 0;
  TcpEnv env(kj::mv(settings));
  {
    auto req = env.pool->request(kj::HttpMethod::POST, "/up", env.headers());
    auto disconnected = req.body->whenWriteDisconnected().then([]() { return true; },
        [](kj::Exception&&) { return true; }).eagerlyEvaluate(nullptr);
    auto response = req.response.then([](auto&&) { return false; },
        [](kj::Exception&&) { return true; }).eagerlyEvaluate(nullptr);
    env.listener = nullptr;  // nothing listens any more: the connect is refused
    KJ_EXPECT(env.bounded(kj::mv(response)), "the request to a closed port succeeded");
    KJ_EXPECT(env.bounded(kj::mv(disconnected)));
  }
  {
    auto req = env.pool->request(kj::HttpMethod::POST, "/up", env.headers());
    auto disconnected = req.body->whenWriteDisconnected().then([]() { return true; },
        [](kj::Exception&&) { return true; }).eagerlyEvaluate(nullptr);
    auto response = req.response.then([](auto&&) { return false; },
        [](kj::Exception&&) { return true; }).eagerlyEvaluate(nullptr);
    req.body = nullptr;  // dropped before any connection took it
    KJ_EXPECT(env.bounded(kj::mv(disconnected)));
    env.bounded(kj::mv(response));
  }
}

KJ_TEST("ConnectionPool: a streamed body's write in flight (the server not reading) kept past the "
    "pool, the body and the response settles, and nothing freed is touched") {
  // Contract (0555b9f; pool.h "Requests, responses and bodies may outlive the pool"): a write
  // promise held by the caller when the pool, then the body and the response go is memory-safe
  // (ASan) and is never left pending for ever; the server sees the connection end.
  ConnectionPool::Settings settings;
  settings.maxReplayBodyBytes = 0;
  TcpEnv env(kj::mv(settings));
  size_t size = 16 << 20;
  auto req = env.pool->request(kj::HttpMethod::POST, "/big", env.headers(), uint64_t(size));
  auto response = req.response.then([](auto&&) { return false; },
      [](kj::Exception&&) { return true; }).eagerlyEvaluate(nullptr);
  auto data = kj::heapArray<kj::byte>(size);
  memset(data.begin(), 'x', size);
  auto write = req.body->write(data.begin(), data.size());
  auto peer = env.accept();
  KJ_EXPECT(peer->readHead().startsWith("POST /big HTTP/1.1\r\n"));
  env.settle(10 * kj::MILLISECONDS);
  KJ_EXPECT(!write.poll(env.ws), "a 16 MiB write finished with the server not reading");
  env.pool = nullptr;
  req.body = nullptr;
  KJ_EXPECT(env.bounded(kj::mv(response)), "the response of an abandoned request succeeded");
  auto failed = test::failureIfAny(env, kj::mv(write));
  KJ_EXPECT(failed != nullptr, "the write of an abandoned request succeeded");
  KJ_EXPECT(env.drainsToEnd(*peer));
}

KJ_TEST("StreamFetcher: a body write in flight (the server not reading) kept past the body and the "
    "fetcher settles, failing, and nothing is touched after it is freed") {
  // Contract (0555b9f, RequestBody::track()): the write's bookkeeping holds the exchange, so a
  // write promise may outlive its body stream and the fetcher; the exchange being over, the
  // write fails (it is never left hanging) and the server sees the connection go.
  test::FetcherEnv env(true);
  auto h = env.headers();
  size_t size = 16 << 20;
  auto req = env.fetcher->request(kj::HttpMethod::POST, "/big", h, uint64_t(size));
  auto response = req.response.then([](auto&&) { return false; },
      [](kj::Exception&&) { return true; }).eagerlyEvaluate(nullptr);
  auto data = kj::heapArray<kj::byte>(size);
  memset(data.begin(), 'x', size);
  auto write = req.body->write(data.begin(), data.size());
  env.settle(10 * kj::MILLISECONDS);
  KJ_EXPECT(!write.poll(env.ws), "a 16 MiB write finished with the server not reading");
  req.body = nullptr;
  env.fetcher = nullptr;
  KJ_EXPECT(env.bounded(kj::mv(response)), "the response of an abandoned request succeeded");
  auto failed = test::failureIfAny(env, kj::mv(write));
  KJ_EXPECT(failed != nullptr, "the write of an abandoned request succeeded");
  KJ_EXPECT(env.peerSawEnd());
}

}  // namespace
}  // namespace sockfetch
