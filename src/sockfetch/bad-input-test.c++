// Bad input and early answers, at their edges: urls that would corrupt the request line, answers
// that are not HTTP/1.x however they arrive, framing fields kj-http reads or refuses (compared
// with kj-http's own client), fields kj-http refuses named in errors, bodies written after an
// early answer, reads cancelled at a chunked end, servers that speak first, CONNECT targets,
// proxies' statuses. From a review of the changes that brought these; the cases named "was: ..."
// failed before the fixes that followed it.
//
// Everything runs over in-process pipes or loopback TCP; every wait is bounded.

#include "connector.h"
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

using test::contains;
using test::FetcherEnv;
using Kind = StreamFetcher::CloseKind;
using Type = kj::Exception::Type;

// =================================================================================================
// Helpers

struct Outcome {
  bool ok = false;
  unsigned status = 0;
  kj::String body;
  kj::String error;
};

kj::String describe(const Outcome& o) {
  if (o.ok) return kj::str("ok ", o.status, " body=\"", o.body, "\"");
  return kj::str("failed: ", o.error);
}

template <typename Func>
Outcome readResponse(test::LoopEnv& env, Func&& send) {
  // `send()` returns the response promise; the body is read to its end.
  Outcome o;
  KJ_IF_SOME(e, kj::runCatchingExceptions([&]() {
    auto r = env.bounded(send());
    o.status = r.statusCode;
    o.body = env.bounded(r.body->readAllText());
    o.ok = true;
  })) {
    o.error = kj::str(e.getDescription());
  }
  return o;
}

Outcome viaKj(kj::HttpMethod method, kj::ArrayPtr<const char> bytes) {
  // The reference: kj-http 0.9.2's own client reading `bytes` (then the end of the connection).
  test::LoopEnv env;
  auto t = test::pipeTransport();
  auto client = kj::newHttpClient(env.table, *t.client);
  test::Peer peer(env.ws, kj::mv(t.server));
  auto text = kj::heapString(bytes.begin(), bytes.size());
  return readResponse(env, [&]() {
    auto req = client->request(method, "/", env.headers());
    req.body = nullptr;
    peer.readRequest();
    peer.send(text);
    peer.close();
    return kj::mv(req.response);
  });
}

Outcome viaFetcher(kj::HttpMethod method, kj::ArrayPtr<const char> bytes) {
  // The same through a StreamFetcher.
  FetcherEnv env(false);
  auto text = kj::heapString(bytes.begin(), bytes.size());
  return readResponse(env, [&]() {
    auto req = env.fetcher->request(method, "/", env.headers());
    req.body = nullptr;
    env.peer->readRequest();
    env.peer->send(text);
    env.peer->close();
    return kj::mv(req.response);
  });
}

struct IgnoreAll final: public kj::TaskSet::ErrorHandler {
  void taskFailed(kj::Exception&&) override {}
};

using test::bytesBeforeEnd;

void feedConsuming(ResponseFramer& framer, kj::ArrayPtr<const char> bytes) {
  // Feeds `bytes` as the owner would, taking everything passable as it comes (a consumer keeping
  // up), so the framer compacts and reuses its buffer as in real use.
  while (bytes.size() > 0 && framer.getFailure() == nullptr) {
    auto space = framer.space();
    size_t n = kj::min(space.size(), bytes.size());
    memcpy(space.begin(), bytes.begin(), n);
    framer.received(n);
    bytes = bytes.slice(n, bytes.size());
    kj::byte sink[4096];
    while (framer.take(kj::arrayPtr(sink, sizeof(sink))) > 0) {}
  }
}

kj::String failureWhenSplit(kj::ArrayPtr<const char> bytes, kj::ArrayPtr<const size_t> cuts,
    bool eof) {
  // Feeds `bytes` in pieces cut at `cuts` (ascending), then the end of the stream if `eof`: the
  // framer's failure, or "(none)".
  ResponseFramer framer;
  framer.start(kj::HttpMethod::GET);
  size_t from = 0;
  for (size_t cut: cuts) {
    feedConsuming(framer, bytes.slice(from, cut));
    from = cut;
  }
  feedConsuming(framer, bytes.slice(from, bytes.size()));
  if (eof) framer.receivedEof();
  KJ_IF_SOME(e, framer.getFailure()) {
    return kj::str(e.getDescription());
  }
  return kj::str("(none)");
}

kj::String failureByteByByte(kj::ArrayPtr<const char> bytes, bool eof) {
  kj::Vector<size_t> cuts;
  for (size_t i = 1; i < bytes.size(); i++) cuts.add(i);
  return failureWhenSplit(bytes, cuts, eof);
}

kj::String failureAtOnce(kj::ArrayPtr<const char> bytes, bool eof) {
  return failureWhenSplit(bytes, nullptr, eof);
}

// =================================================================================================
// Framing kj-http reads is read (no lost responses); framing it refuses, refused in our words

KJ_TEST("a Content-Length repeated (or listed twice) where kj-http ignores it (HEAD, 204, 304, and "
        "beside `Transfer-Encoding: chunked`) is read as kj-http reads it (was: refused, a lost "
        "response)") {
  // kj-http 0.9.2 ignores Content-Length on 204/304 and when Transfer-Encoding is present, and
  // takes strtoull() of it on a HEAD response: the framer refuses a repeated one only where it
  // frames a body. The response is delivered as kj-http's own client delivers it (reuse is not
  // required).
  struct Case {
    kj::HttpMethod method;
    kj::StringPtr bytes;
  };
  Case cases[] = {
    {kj::HttpMethod::HEAD, "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n"_kj},
    {kj::HttpMethod::HEAD, "HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\n"_kj},
    {kj::HttpMethod::GET,
     "HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n"_kj},
    {kj::HttpMethod::GET, "HTTP/1.1 204 No Content\r\nContent-Length: 5, 5\r\n\r\n"_kj},
    {kj::HttpMethod::GET, "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n"
        "Content-Length: 5\r\n\r\n5\r\nhello\r\n0\r\n\r\n"_kj},
  };
  for (auto& c: cases) {
    KJ_CONTEXT(c.bytes);
    auto reference = viaKj(c.method, c.bytes);
    KJ_ASSERT(reference.ok, "kj-http itself refuses this case", describe(reference));
    auto got = viaFetcher(c.method, c.bytes);
    KJ_EXPECT(got.ok && got.status == reference.status && got.body == reference.body,
        "sockfetch lost a response kj-http reads", describe(reference), describe(got));
  }
}

KJ_TEST("an empty Transfer-Encoding field is taken for an absent one, as kj-http takes it (was: "
        "refused as a coding kj-http cannot decode)") {
  // kj::HttpHeaders::get() treats an empty value as absent, so kj-http frames these by
  // Content-Length, by the end of the connection, or by the later `chunked` field.
  kj::StringPtr cases[] = {
    "HTTP/1.1 200 OK\r\nTransfer-Encoding:\r\nContent-Length: 5\r\n\r\nhello"_kj,
    "HTTP/1.1 200 OK\r\nTransfer-Encoding: \r\n\r\nhello"_kj,
    "HTTP/1.1 200 OK\r\nTransfer-Encoding:\r\nTransfer-Encoding: chunked\r\n\r\n"
        "5\r\nhello\r\n0\r\n\r\n"_kj,
  };
  for (auto bytes: cases) {
    KJ_CONTEXT(bytes);
    auto reference = viaKj(kj::HttpMethod::GET, bytes);
    KJ_ASSERT(reference.ok && reference.body == "hello", describe(reference));
    auto got = viaFetcher(kj::HttpMethod::GET, bytes);
    KJ_EXPECT(got.ok && got.body == "hello", "sockfetch lost a response kj-http reads",
        describe(got));
  }
}

KJ_TEST("a Content-Length of 19 digits with leading zeros is read for its value, 5, as kj-http "
        "reads "
        "it (was: called \"too large\")") {
  // Leading zeros do not count towards the framer's cap (values below 10^18).
  auto bytes = "HTTP/1.1 200 OK\r\nContent-Length: 0000000000000000005\r\n\r\nhello"_kj;
  auto reference = viaKj(kj::HttpMethod::GET, bytes);
  KJ_ASSERT(reference.ok && reference.body == "hello", describe(reference));
  auto got = viaFetcher(kj::HttpMethod::GET, bytes);
  KJ_EXPECT(got.ok && got.body == "hello", describe(got));
}

KJ_TEST("`Transfer-Encoding: chunked` with trailing whitespace (or folded onto a continuation "
        "line), "
        "which kj-http refuses, fails in the library's words (was: kj-http's \"unknown transfer "
        "encoding\")") {
  // kj-http 0.9.2 keeps blanks after the value, and refuses "chunked " (reference below); an
  // obsolete line folding before the value does the same (kj-http turns the line break into
  // spaces it keeps). The framer compares the value as kj-http keeps it, and refuses it first.
  for (auto value: {"chunked "_kj, "chunked\t"_kj, "\r\n chunked"_kj}) {
    KJ_CONTEXT(value);
    auto bytes = kj::str("HTTP/1.1 200 OK\r\nTransfer-Encoding:", value[0] == '\r' ? "" : " ",
        value,
        "\r\n\r\n5\r\nhello\r\n0\r\n\r\n");
    auto reference = viaKj(kj::HttpMethod::GET, bytes);
    KJ_ASSERT(!reference.ok, "kj-http reads it after all", describe(reference));
    auto got = viaFetcher(kj::HttpMethod::GET, bytes);
    KJ_ASSERT(!got.ok, describe(got));
    KJ_EXPECT(!contains(got.error, "unknown transfer encoding"), got.error);
    KJ_EXPECT(contains(got.error, "kj-http cannot decode"), got.error);
  }
}

// =================================================================================================
// Early answers

void earlyAnswerThenWrite(FetcherEnv& env, kj::StringPtr answer) {
  // POST with 10 declared bytes; 5 are written and read by the server, which answers `answer`
  // early; the response is read to its end. Then the caller writes the rest, which must be taken
  // and discarded (stream-fetcher.h: "writes to it succeed"), and never reach the server.
  auto req = env.fetcher->request(kj::HttpMethod::POST, "/up", env.headers(), uint64_t(10));
  auto write = writeAll(*req.body, "12345"_kj.asBytes());
  env.peer->readHead();
  KJ_ASSERT(env.peer->readExactly(5) == "12345");
  env.bounded(kj::mv(write));
  auto sent = env.peer->sendLater(answer).eagerlyEvaluate([](kj::Exception&&) {});
  auto r = env.bounded(kj::mv(req.response));
  KJ_EXPECT(r.statusCode == 413);
  KJ_EXPECT(env.bounded(r.body->readAllText()) == "big");
  KJ_EXPECT(env.fetcher->getState() == StreamFetcher::State::CLOSED);
  KJ_IF_SOME(e, test::failureIfAny(env, writeAll(*req.body, "67890"_kj.asBytes()))) {
    KJ_FAIL_EXPECT("a write after an early answer failed instead of being discarded",
        env.fetcher->getCloseKind(), e);
  }
  req.body = nullptr;
  KJ_EXPECT(bytesBeforeEnd(env, env.peer->getStream()).orDefault(1) == 0,
      "a discarded byte reached the server, or it never saw the end");
}

SOCKFETCH_TRANSPORT_PAIR(FetcherEnv, earlyAnswerWithClose,
    "an early answer that says `Connection: close` (413's usual form) discards the rest of the "
    "body too: later writes succeed, nothing reaches the server (was: they failed)",
    "pipe", (false), "TCP", (true)) {
  // The exchange ends as CONNECTION_CLOSE, not REQUEST_INCOMPLETE, but the rest of the body is
  // discarded all the same: a failed write would fail kj::newHttpService()'s request-body pump,
  // and kj::HttpServer would drop its client's connection, for the most common early answer.
  earlyAnswerThenWrite(env,
      "HTTP/1.1 413 Payload Too Large\r\nConnection: close\r\nContent-Length: 3\r\n\r\nbig");
}

SOCKFETCH_TRANSPORT_PAIR(FetcherEnv, earlyAnswerHttp10,
    "an HTTP/1.0 early answer discards the rest of the body too (was: later writes failed)",
    "pipe", (false), "TCP", (true)) {
  earlyAnswerThenWrite(env, "HTTP/1.0 413 Payload Too Large\r\nContent-Length: 3\r\n\r\nbig");
}

KJ_TEST("on a stream without a descriptor (a pipe, the TLS-like wrapper over one), a body write in "
        "flight when an early answer is read to its end completes, discarded (was: it never did)") {
  // The server answers early and reads no more of the body. Nothing can end a write pending on a
  // stream without a descriptor (shutdownNow() leaves it alone): the exchange ends the caller's
  // write itself, or the caller (a kj::newHttpService() pump, and its client) would wait for a
  // server that never reads.
  for (bool tls: {false, true}) {
    KJ_CONTEXT(tls);
    FetcherEnv env(false, tls);
    auto req = env.fetcher->request(kj::HttpMethod::POST, "/up", env.headers(),
        uint64_t(100000));
    auto big = kj::heapArray<kj::byte>(100000);
    memset(big.begin(), 'a', big.size());
    auto write = req.body->write(big.begin(), big.size()).eagerlyEvaluate(nullptr);
    env.peer->readHead();
    auto sent = env.peer->sendLater("HTTP/1.1 413 Payload Too Large\r\nContent-Length: "
                                    "3\r\n\r\nbig")
        .eagerlyEvaluate([](kj::Exception&&) {});
    auto r = env.bounded(kj::mv(req.response));
    KJ_EXPECT(env.bounded(r.body->readAllText()) == "big");
    KJ_EXPECT(env.fetcher->getCloseKind() == Kind::REQUEST_INCOMPLETE, env.why());
    env.limit = 300 * kj::MILLISECONDS;
    KJ_IF_SOME(e, test::failureIfAny(env, kj::mv(write))) {
      KJ_FAIL_EXPECT("the write in flight at the early answer did not complete", e);
    }
  }
}

// =================================================================================================
// findFieldKjRefuses() names only what kj-http refuses

KJ_TEST("a failed WebSocket handshake whose 101 carries a field name with a non-ASCII byte "
        "(kj-http "
        "accepts it) is reported as the handshake's failure (was: \"malformed HTTP response "
        "(invalid field name ...)\")") {
  // kj-http 0.9.2 takes any byte but controls, DEL, whitespace and separators in a field name
  // (bytes >= 0x80 included): findFieldKjRefuses() flags only those, so the real reason (here a
  // wrong Sec-WebSocket-Accept, kj-http's own check) is not replaced by a field the server's head
  // did not have wrong. The control shows kj-http accepts the field.
  constexpr kj::StringPtr FIELD = "X-Caf\xc3\xa9: 1\r\n"_kj;
  {
    FetcherEnv env(false);
    auto promise = env.fetcher->openWebSocket("/ws", env.headers());
    auto head = env.peer->readHead();
    // The key from the request head.
    auto pos = strstr(head.cStr(), "Sec-WebSocket-Key: ");
    KJ_ASSERT(pos != nullptr, head);
    pos += strlen("Sec-WebSocket-Key: ");
    auto key = kj::heapString(pos, strchr(pos, '\r') - pos);
    auto answer = kj::str("HTTP/1.1 101 Switching Protocols\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\n", FIELD, "Sec-WebSocket-Accept: ",
        test::webSocketAccept(key), "\r\n\r\n");
    auto sent = env.peer->sendLater(answer).eagerlyEvaluate([](kj::Exception&&) {});
    auto response = env.bounded(kj::mv(promise));
    KJ_ASSERT(response.webSocketOrBody.is<kj::Own<kj::WebSocket>>(),
        "control: kj-http accepts the field, the WebSocket opens");
  }
  FetcherEnv env(false);
  auto promise = env.fetcher->openWebSocket("/ws", env.headers());
  env.peer->readHead();
  auto answer = kj::str("HTTP/1.1 101 Switching Protocols\r\n"
      "Upgrade: websocket\r\nConnection: Upgrade\r\n", FIELD,
      "Sec-WebSocket-Accept: wrong\r\n\r\n");
  auto sent = env.peer->sendLater(answer).eagerlyEvaluate([](kj::Exception&&) {});
  auto e = env.failureOf(kj::mv(promise));
  KJ_EXPECT(!contains(e.getDescription(), "invalid field name"), e);
  KJ_EXPECT(contains(e.getDescription(), "WebSocket"), e);
}

// =================================================================================================
// "Not HTTP/1.x" whatever the split

KJ_TEST("with more than 40 blanks before a first line that is not HTTP, the failure is the same "
        "however the bytes were split (was: byte by byte it waited)") {
  // Blanks may precede "HTTP/1.", so the check runs until the status line has begun, however many
  // of them came first; a server that then waits is not waited for.
  auto blanks = kj::str(kj::repeat(' ', 45));
  for (auto rest: {"SSH-2.0-OpenSSH_9.2\r\n"_kj, "SSH-2.0-OpenSSH_9.2\r\n\r\n"_kj}) {
    auto bytes = kj::str(blanks, rest);
    KJ_CONTEXT(bytes);
    auto atOnce = failureAtOnce(bytes, false);
    auto byByte = failureByteByByte(bytes, false);
    KJ_EXPECT(contains(atOnce, "is not HTTP/1.x"), atOnce);
    KJ_EXPECT(atOnce == byByte, atOnce, byByte);
  }
}

// =================================================================================================
// "The server spoke first" only on a connection that carried no exchange

KJ_TEST("a connection released after an exchange and wrapped in a new StreamFetcher keeps its "
        "history: later unsolicited bytes poison it as any, not as a server that \"spoke first\"") {
  // The connection carried a request and an HTTP/1.1 response under the first fetcher: a message
  // telling the user to check the address would be wrong.
  FetcherEnv env(false);
  env.roundTrip("/first");
  auto stream = env.fetcher->release();
  env.fetcher = kj::heap<StreamFetcher>(kj::mv(stream), env.table, env.settings());
  auto sent = env.peer->sendLater("garbage").eagerlyEvaluate([](kj::Exception&&) {});
  env.waitFor([&]() { return env.fetcher->getState() == StreamFetcher::State::CLOSED; });
  KJ_ASSERT(env.fetcher->getCloseKind() == Kind::UNSOLICITED_BYTES, env.why());
  KJ_EXPECT(!contains(env.why(), "before any request was sent"), env.why());
  KJ_EXPECT(!env.fetcher->serverSpokeFirst());
}

// =================================================================================================
// tunnelConnector's target check

KJ_TEST("tunnelConnector refuses an unbracketed IPv6 address (no port) and a port above 65535 as "
        "host:port (was: taken)") {
  // The last colon's digits are no port when the host is an unbracketed IPv6 address.
  auto never = []() -> kj::Promise<kj::Own<kj::AsyncIoStream>> {
    return KJ_EXCEPTION(FAILED, "not connecting");
  };
  for (auto target: {"[2001:db8::1]"_kj, "example.com"_kj}) {
    KJ_EXPECT(kj::runCatchingExceptions([&]() { tunnelConnector(never, target); }) != nullptr,
        "control: refused", target);
  }
  for (auto target: {"2001:db8::1"_kj, "::1"_kj, "example.com:99999"_kj}) {
    KJ_EXPECT(kj::runCatchingExceptions([&]() { tunnelConnector(never, target); }) != nullptr,
        "accepted a target that is not host:port", target);
  }
  // What is right stays accepted.
  for (auto target: {"[2001:db8::1]:443"_kj, "example.com:443"_kj, "10.0.0.1:8080"_kj}) {
    KJ_EXPECT(kj::runCatchingExceptions([&]() { tunnelConnector(never, target); }) == nullptr,
        target);
  }
}

// =================================================================================================
// Sound: url validation (1)

KJ_TEST("sound: a url that is empty or has a space or control character is refused at once, "
        "FAILED, nothing written and nothing counted, by StreamFetcher and ConnectionPool; the "
        "fetcher stays usable; non-ASCII bytes pass") {
  kj::StringPtr bad[] = {""_kj, "/a b"_kj, "/a\r\nX: 1"_kj, "/\t"_kj, "/\x7f"_kj,
                         kj::StringPtr("/a\0b", 4)};
  {
    FetcherEnv env(false);
    for (auto url: bad) {
      KJ_CONTEXT(quoteBytes(url));
      auto e = kj::runCatchingExceptions([&]() {
        env.fetcher->request(kj::HttpMethod::POST, url, env.headers(), uint64_t(3));
      });
      auto& ex = KJ_ASSERT_NONNULL(e);
      KJ_EXPECT(ex.getType() == Type::FAILED, ex);
      KJ_EXPECT(kj::runCatchingExceptions([&]() {
        env.fetcher->openWebSocket(url, env.headers());
      }) != nullptr);
      KJ_EXPECT(env.fetcher->getState() == StreamFetcher::State::IDLE);
    }
    KJ_EXPECT(env.peer->readWouldBlock(), "something was written for a refused request");
    env.roundTrip("/caf\xc3\xa9");
  }
  {
    test::LoopEnv env;
    unsigned connects = 0;
    ConnectionPool pool(env.timer, env.table, [&]() -> kj::Promise<kj::Own<kj::AsyncIoStream>> {
      ++connects;
      return KJ_EXCEPTION(FAILED, "no connection expected");
    });
    for (auto url: bad) {
      KJ_CONTEXT(quoteBytes(url));
      KJ_EXPECT(kj::runCatchingExceptions([&]() {
        pool.request(kj::HttpMethod::GET, url, env.headers());
      }) != nullptr);
      KJ_EXPECT(kj::runCatchingExceptions([&]() {
        pool.openWebSocket(url, env.headers());
      }) != nullptr);
    }
    env.settle(5 * kj::MILLISECONDS);
    KJ_EXPECT(connects == 0);
    KJ_EXPECT(pool.getStats().requests == 0, pool.getStats().requests);
  }
}

// =================================================================================================
// Sound: "not HTTP/1.x" (2)

KJ_TEST("sound: \"not HTTP/1.x\" is the same failure at every two-piece split and byte by byte, "
        "for banners, binary, long and huge first lines; after interim responses, a malformed "
        "response") {
  struct Input {
    kj::String bytes;
    bool eof;  // a first line that neither ends nor reaches 41 bytes fails at the end only
  };
  kj::Vector<Input> inputs;
  inputs.add(Input{kj::str("SSH-2.0-OpenSSH_9.2\r\n"), false});
  inputs.add(Input{kj::heapString("\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\"\\\x00\xff", 15),
      true});
  inputs.add(Input{kj::str("HTTP/1.1 100 Continue\r\n\r\nSSH-2.0-x\r\n"), false});
  inputs.add(Input{kj::str("HTTP/1.1 103 Early Hints\r\nLink: <a>\r\n\r\nHTTP/1.1 100 Continue\r\n"
      "\r\n", kj::repeat('g', 200)), false});
  inputs.add(Input{kj::str("HTTP/2 200 OK\r\n\r\n"), false});
  inputs.add(Input{kj::str(" \tXYZ\r\n"), false});
  inputs.add(Input{kj::str(kj::repeat('Z', 40), "\r\n"), false});
  inputs.add(Input{kj::str(kj::repeat('Z', 41), "\r\n"), false});
  inputs.add(Input{kj::str("\r\nHTTP/1.1 200 OK\r\n\r\n"), false});
  inputs.add(Input{kj::str(kj::repeat('x', 200000)), false});
  for (auto& input: inputs) {
    KJ_CONTEXT(quoteBytes(input.bytes));
    auto atOnce = failureAtOnce(input.bytes, input.eof);
    bool afterInterim = input.bytes.startsWith("HTTP/1.1 1");
    KJ_EXPECT(contains(atOnce, afterInterim
        ? "malformed HTTP response (after an interim (1xx) response, the next response began with "
        : "the server's answer is not HTTP/1.x (it began with "), atOnce);
    KJ_EXPECT(failureByteByByte(input.bytes, input.eof) == atOnce);
    size_t step = input.bytes.size() > 1000 ? 997 : 1;
    for (size_t cut = 1; cut < input.bytes.size(); cut += step) {
      size_t cuts[] = {cut};
      KJ_EXPECT(failureWhenSplit(input.bytes, cuts, input.eof) == atOnce, cut);
    }
  }
  // What the error shows: quoted, escaped, cut at 40 with "...".
  auto binary = failureAtOnce(inputs[1].bytes, true);
  KJ_EXPECT(contains(binary, "(it began with \"\\x16\\x03\\x01\\x02\\x00\\x01\\x00\\x01\\xfc"
      "\\x03\\x03\\\"\\\\\\x00\\xff\")"), binary);
  KJ_EXPECT(contains(failureAtOnce(inputs[6].bytes, false),
      kj::str("\"", kj::repeat('Z', 40), "\")")));
  KJ_EXPECT(contains(failureAtOnce(inputs[7].bytes, false),
      kj::str("\"", kj::repeat('Z', 40), "\"...")));
  KJ_EXPECT(contains(failureAtOnce(inputs[8].bytes, false), "(it began with an empty line)"));
}

KJ_TEST("sound: EOF after every prefix of an interim-then-final response never says \"not "
        "HTTP/1.x\"; EOF after every prefix of a banner says it, showing the prefix") {
  auto good = "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"_kj;
  for (size_t n = 0; n <= good.size(); n++) {
    auto prefix = good.slice(0, n);
    for (bool byByte: {false, true}) {
      auto f = byByte ? failureByteByByte(prefix, true) : failureAtOnce(prefix, true);
      KJ_EXPECT(!contains(f, "not HTTP"), n, f);
      if (n < good.size()) {
        KJ_EXPECT(f != "(none)", n, "a truncated response passed");
      } else {
        KJ_EXPECT(f == "(none)", f);
      }
    }
  }
  auto banner = "SSH-2.0-OpenSSH_9.2\r\n"_kj;
  for (size_t n = 1; n <= banner.size(); n++) {
    auto prefix = banner.slice(0, n);
    auto lineEnd = kj::min(n, size_t(19));
    auto expected = kj::str("(it began with ", quoteBytes(banner.slice(0, lineEnd)), ")");
    KJ_EXPECT(contains(failureAtOnce(prefix, true), expected), n, failureAtOnce(prefix, true));
    KJ_EXPECT(failureByteByByte(prefix, true) == failureAtOnce(prefix, true), n);
  }
}

// =================================================================================================
// Sound: findFieldKjRefuses() (4)

KJ_TEST("sound: findFieldKjRefuses() describes the head it parsed, and nothing once later bytes "
        "may have landed on it (taken and reused from the start, compacted)") {
  auto head = "HTTP/1.1 200 OK\r\nBad Name: x\r\nContent-Length: 24\r\n\r\n"_kj;
  auto bodyLikeAHead = "Evil Name: yyyyyyyyyy\r\n\r\n"_kj;  // its first 24 bytes are the body
  ResponseFramer framer;
  framer.start(kj::HttpMethod::GET);
  {
    auto space = framer.space();
    memcpy(space.begin(), head.begin(), head.size());
    framer.received(head.size());
  }
  KJ_EXPECT(contains(KJ_ASSERT_NONNULL(framer.findFieldKjRefuses()), "Bad Name"));
  kj::byte sink[256];
  KJ_EXPECT(framer.take(kj::arrayPtr(sink, sizeof(sink))) == head.size());
  // Everything taken: the framer reuses its buffer from the start. Until it does, the head is
  // still there.
  KJ_IF_SOME(field, framer.findFieldKjRefuses()) {
    KJ_EXPECT(contains(field, "Bad Name"), field);
  }
  {
    auto space = framer.space();
    memcpy(space.begin(), bodyLikeAHead.begin(), 24);
    framer.received(24);
  }
  KJ_EXPECT(framer.findFieldKjRefuses() == nullptr, "described bytes that are not the head",
      KJ_ASSERT_NONNULL(framer.findFieldKjRefuses()));
  KJ_EXPECT(framer.isComplete());

  // A chunked body whose chunk lines keep the buffer from resetting: it is compacted as it fills,
  // and chunk data that looks like a bad field never shows up as one.
  ResponseFramer second;
  second.start(kj::HttpMethod::GET);
  feedConsuming(second, "HTTP/1.1 200 OK\r\nBad Name: x\r\nTransfer-Encoding: chunked\r\n\r\n"_kj);
  KJ_EXPECT(contains(KJ_ASSERT_NONNULL(second.findFieldKjRefuses()), "Bad Name"));
  auto chunk = "10\r\nEvil Name: yyy\r\n\r\n"_kj;  // 16 bytes of data
  for (int i = 0; i < 2000; i++) {
    feedConsuming(second, chunk);
    KJ_IF_SOME(field, second.findFieldKjRefuses()) {
      KJ_ASSERT(contains(field, "Bad Name") && !contains(field, "Evil"), i, field);
    }
  }
  KJ_EXPECT(second.getFailure() == nullptr);
}

// =================================================================================================
// Sound: early answers (5)

SOCKFETCH_TRANSPORT_PAIR(FetcherEnv, earlyAnswerDiscards,
    "sound: after an early answer read to its end, later writes (whole, in pieces, empty) succeed "
    "and nothing of them reaches the server, which sees the connection end",
    "pipe", (false), "TCP", (true)) {
  auto req = env.fetcher->request(kj::HttpMethod::POST, "/up", env.headers(), uint64_t(10));
  auto write = writeAll(*req.body, "12345"_kj.asBytes());
  env.peer->readHead();
  KJ_ASSERT(env.peer->readExactly(5) == "12345");
  env.bounded(kj::mv(write));
  auto sent = env.peer->sendLater("HTTP/1.1 413 Payload Too Large\r\nContent-Length: 3\r\n\r\nbig")
      .eagerlyEvaluate([](kj::Exception&&) {});
  auto r = env.bounded(kj::mv(req.response));
  KJ_EXPECT(env.bounded(r.body->readAllText()) == "big");
  KJ_EXPECT(env.fetcher->getCloseKind() == Kind::REQUEST_INCOMPLETE, env.why());
  env.bounded(req.body->write("6", 1));
  env.bounded(req.body->write("", 0));
  kj::ArrayPtr<const kj::byte> pieces[] = {"78"_kj.asBytes(), "90"_kj.asBytes()};
  env.bounded(req.body->write(pieces));
  env.bounded(req.body->write("past the declared length", 24));  // discarded too
  req.body = nullptr;
  r.body = nullptr;
  KJ_EXPECT(bytesBeforeEnd(env, env.peer->getStream()).orDefault(1) == 0,
      "a discarded byte reached the server, or it never saw the end");
  KJ_EXPECT(kj::runCatchingExceptions([&]() {
    env.fetcher->request(kj::HttpMethod::GET, "/", env.headers());
  }) != nullptr, "the connection was reused");
}

KJ_TEST("sound: a chunked body answered early: later writes and the dropped body's terminator "
        "never reach the server (pipe and TCP)") {
  for (bool tcp: {false, true}) {
    KJ_CONTEXT(tcp);
    FetcherEnv env(tcp);
    auto req = env.fetcher->request(kj::HttpMethod::POST, "/up", env.headers());
    auto write = writeAll(*req.body, "12345"_kj.asBytes());
    env.peer->readHead();
    KJ_ASSERT(env.peer->readExactly(10) == "5\r\n12345\r\n");
    env.bounded(kj::mv(write));
    auto sent = env.peer->sendLater("HTTP/1.1 413 Payload Too Large\r\nContent-Length: "
                                    "3\r\n\r\nbig")
        .eagerlyEvaluate([](kj::Exception&&) {});
    auto r = env.bounded(kj::mv(req.response));
    KJ_EXPECT(env.bounded(r.body->readAllText()) == "big");
    KJ_EXPECT(env.fetcher->getCloseKind() == Kind::REQUEST_INCOMPLETE, env.why());
    env.bounded(writeAll(*req.body, "67890"_kj.asBytes()));
    req.body = nullptr;  // kj-http writes "0\r\n\r\n" now: refused, never sent
    r.body = nullptr;
    KJ_EXPECT(bytesBeforeEnd(env, env.peer->getStream()).orDefault(1) == 0,
        "a discarded byte reached the server, or it never saw the end");
  }
}

KJ_TEST("sound: on TCP (plain and TLS-like), a body write stuck in flight when an early answer is "
        "read to its end completes, its failure swallowed, and the connection is not reused") {
  for (bool tls: {false, true}) {
    KJ_CONTEXT(tls);
    FetcherEnv env(true, tls);
    auto big = kj::heapArray<kj::byte>(16 << 20);  // more than the socket buffers hold
    memset(big.begin(), 'b', big.size());
    auto req = env.fetcher->request(kj::HttpMethod::POST, "/up", env.headers(),
        uint64_t(big.size()));
    auto write = req.body->write(big.begin(), big.size()).eagerlyEvaluate(nullptr);
    env.peer->readHead();
    env.peer->send("HTTP/1.1 413 Payload Too Large\r\nContent-Length: 3\r\n\r\nbig");
    auto r = env.bounded(kj::mv(req.response));
    KJ_EXPECT(env.bounded(r.body->readAllText()) == "big");
    KJ_EXPECT(env.fetcher->getCloseKind() == Kind::REQUEST_INCOMPLETE, env.why());
    KJ_IF_SOME(e, test::failureIfAny(env, kj::mv(write))) {
      KJ_FAIL_EXPECT("the stuck write failed or hung", e);
    }
    env.bounded(req.body->write("more", 4));
    KJ_EXPECT(kj::runCatchingExceptions([&]() {
      env.fetcher->request(kj::HttpMethod::GET, "/", env.headers());
    }) != nullptr, "the connection was reused");
  }
}

KJ_TEST("sound: an exchange not answered early still reports a failed body write, and the "
        "response then fails DISCONNECTED") {
  FetcherEnv env(false);
  auto req = env.fetcher->request(kj::HttpMethod::POST, "/", env.headers(), uint64_t(10));
  env.peer->readHead();
  env.peer->close();
  auto e = KJ_ASSERT_NONNULL(test::failureIfAny(env, req.body->write("hello", 5)));
  KJ_EXPECT(e.getType() == Type::DISCONNECTED, e);
  KJ_EXPECT(kj::runCatchingExceptions([&]() { env.bounded(req.body->write("a", 1)); }) != nullptr);
  req.body = nullptr;
  auto response = env.failureOf(kj::mv(req.response));
  KJ_EXPECT(response.getType() == Type::DISCONNECTED, response);
}

KJ_TEST("sound: ConnectionPool (pipes, streamed body): an early answer closes the connection, "
        "counted once as request_incomplete; later writes succeed; the next request gets a new "
        "connection") {
  test::LoopEnv env;
  kj::Vector<kj::Own<test::Peer>> peers;
  ConnectionPool::Settings settings;
  settings.maxReplayBodyBytes = 0;
  ConnectionPool pool(env.timer, env.table, [&]() {
    auto t = test::pipeTransport();
    peers.add(kj::heap<test::Peer>(env.ws, kj::mv(t.server)));
    return kj::Promise<kj::Own<kj::AsyncIoStream>>(kj::mv(t.client));
  }, settings);
  auto req = pool.request(kj::HttpMethod::POST, "/up", env.headers(), uint64_t(10));
  auto write = writeAll(*req.body, "12345"_kj.asBytes()).eagerlyEvaluate(nullptr);
  env.waitFor([&]() { return peers.size() == 1; });
  KJ_ASSERT(peers.size() == 1);
  peers[0]->readHead();
  KJ_ASSERT(peers[0]->readExactly(5) == "12345");
  env.bounded(kj::mv(write));
  auto sent = peers[0]->sendLater("HTTP/1.1 413 Payload Too Large\r\nContent-Length: 3\r\n\r\nbig")
      .eagerlyEvaluate([](kj::Exception&&) {});
  auto r = env.bounded(kj::mv(req.response));
  KJ_EXPECT(env.bounded(r.body->readAllText()) == "big");
  env.bounded(writeAll(*req.body, "67890"_kj.asBytes()));
  req.body = nullptr;
  r.body = nullptr;
  env.settle(5 * kj::MILLISECONDS);
  auto& s = pool.getStats();
  KJ_EXPECT(s.droppedRequestIncomplete == 1, s.droppedRequestIncomplete);
  KJ_EXPECT(s.dropped() == 1, s.dropped());
  KJ_EXPECT(pool.getOpenCount() == 0, pool.getOpenCount());
  KJ_EXPECT(bytesBeforeEnd(env, peers[0]->getStream()).orDefault(1) == 0,
      "a discarded byte reached the server, or it never saw the end");
  auto next = pool.request(kj::HttpMethod::GET, "/next", env.headers());
  auto nextResponse = kj::mv(next.response).eagerlyEvaluate(nullptr);
  env.waitFor([&]() { return peers.size() == 2; });
  KJ_ASSERT(peers.size() == 2, "the early-answered connection was reused");
  peers[1]->readRequest();
  auto ok = peers[1]->sendLater(test::OK_HELLO).eagerlyEvaluate([](kj::Exception&&) {});
  auto r2 = env.bounded(kj::mv(nextResponse));
  KJ_EXPECT(env.bounded(r2.body->readAllText()) == "hello");
  KJ_EXPECT(s.connectionsOpened == 2 && s.retries == 0, s.connectionsOpened, s.retries);
}

KJ_TEST("sound: a fixed-length body refuses a write past the declared size, counting writes in "
        "flight and pieces; an empty write at the limit passes; the exchange then completes") {
  FetcherEnv env(false);
  auto req = env.fetcher->request(kj::HttpMethod::POST, "/", env.headers(), uint64_t(6));
  auto first = req.body->write("abcd", 4);  // in flight: the pipe completes it only once read
  auto tooLong = kj::runCatchingExceptions([&]() { env.bounded(req.body->write("xyz", 3)); });
  KJ_EXPECT(contains(KJ_ASSERT_NONNULL(tooLong).getDescription(),
      "longer than the declared 6 bytes"));
  kj::ArrayPtr<const kj::byte> pieces[] = {"e"_kj.asBytes(), "fg"_kj.asBytes()};
  auto piecesTooLong = kj::runCatchingExceptions([&]() { env.bounded(req.body->write(pieces)); });
  KJ_EXPECT(piecesTooLong != nullptr);
  auto request = env.peer->readHead();
  KJ_EXPECT(env.peer->readExactly(4) == "abcd");
  env.bounded(kj::mv(first));
  auto rest = writeAll(*req.body, "ef"_kj.asBytes()).then([&]() {
    return req.body->write("", 0);
  }).eagerlyEvaluate(nullptr);
  KJ_EXPECT(env.peer->readExactly(2) == "ef");
  env.bounded(kj::mv(rest));
  req.body = nullptr;
  auto sent = env.peer->sendLater(test::OK_HELLO).eagerlyEvaluate([](kj::Exception&&) {});
  auto r = env.bounded(kj::mv(req.response));
  KJ_EXPECT(env.bounded(r.body->readAllText()) == "hello");
  KJ_EXPECT(env.fetcher->getState() == StreamFetcher::State::IDLE, env.why());
}

// =================================================================================================
// Sound: a read cancelled while a chunked response's end was arriving (6)

enum class Order { READ_THEN_FETCHER, BODY_FIRST, READ_AFTER_FETCHER_GONE, DROP_WITHOUT_READ };

void cancelledEnd(FetcherEnv& env, Order order) {
  auto req = env.fetcher->request(kj::HttpMethod::GET, "/", env.headers());
  req.body = nullptr;
  env.peer->readRequest();
  env.peer->send("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nX-T: 1\r\n");
  auto r = env.bounded(kj::mv(req.response));
  char buffer[16];
  KJ_EXPECT(env.read(*r.body, buffer, 2, 2) == 2);
  {
    auto end = r.body->tryRead(buffer, 1, sizeof(buffer));
    KJ_EXPECT(!end.poll(env.ws));  // waits for the end of the trailers; the caller gives up
  }
  auto rest = env.peer->sendLater("\r\n").eagerlyEvaluate([](kj::Exception&&) {});
  switch (order) {
    case Order::READ_THEN_FETCHER:
      KJ_EXPECT(env.read(*r.body, buffer, 1, sizeof(buffer)) == 0);
      KJ_EXPECT(env.fetcher->getCloseKind() == Kind::ABANDONED, env.why());
      KJ_EXPECT(kj::runCatchingExceptions([&]() {
        env.fetcher->request(kj::HttpMethod::GET, "/", env.headers());
      }) != nullptr, "reused");
      env.fetcher = nullptr;
      KJ_EXPECT(env.read(*r.body, buffer, 1, sizeof(buffer)) == 0);
      r.body = nullptr;
      break;
    case Order::BODY_FIRST:
      KJ_EXPECT(env.read(*r.body, buffer, 1, sizeof(buffer)) == 0);
      r.body = nullptr;
      KJ_EXPECT(env.fetcher->getState() == StreamFetcher::State::CLOSED);
      env.fetcher = nullptr;
      break;
    case Order::READ_AFTER_FETCHER_GONE:
      env.fetcher = nullptr;
      KJ_EXPECT(env.read(*r.body, buffer, 1, sizeof(buffer)) == 0);
      KJ_EXPECT(r.body->tryGetLength().orDefault(1) == 0);
      r.body = nullptr;
      break;
    case Order::DROP_WITHOUT_READ:
      r.body = nullptr;
      KJ_EXPECT(env.fetcher->getCloseKind() == Kind::ABANDONED, env.why());
      break;
  }
  KJ_EXPECT(env.peerSawEnd(), "the connection was kept");
}

KJ_TEST("sound: a read cancelled while chunked trailers arrived: the next read returns 0 at once, "
        "the connection goes, in every destruction order, on pipes, TCP and the TLS-like wrapper") {
  for (bool tcp: {false, true}) {
    for (bool tls: {false, true}) {
      for (auto order: {Order::READ_THEN_FETCHER, Order::BODY_FIRST,
                        Order::READ_AFTER_FETCHER_GONE, Order::DROP_WITHOUT_READ}) {
        KJ_CONTEXT(tcp, tls, (int)order);
        FetcherEnv env(tcp, tls);
        cancelledEnd(env, order);
      }
    }
  }
}

// =================================================================================================
// Sound: the server spoke first (7)

KJ_TEST("sound: the pool retries a request once when new connections' servers speak first, "
        "counting each as unsolicited bytes, and the error names what came") {
  test::LoopEnv env;
  kj::Vector<kj::Own<test::Peer>> peers;
  kj::Own<kj::TaskSet::ErrorHandler> ignore = kj::heap<IgnoreAll>();
  kj::TaskSet tasks(*ignore);
  ConnectionPool pool(env.timer, env.table, [&]() {
    auto t = test::pipeTransport();
    auto peer = kj::heap<test::Peer>(env.ws, kj::mv(t.server));
    tasks.add(peer->sendLater("220 smtp ready\r\n"));
    peers.add(kj::mv(peer));
    return kj::Promise<kj::Own<kj::AsyncIoStream>>(kj::mv(t.client));
  });
  auto req = pool.request(kj::HttpMethod::GET, "/", env.headers());
  auto e = env.failureOf(kj::mv(req.response));
  KJ_EXPECT(e.getType() == Type::DISCONNECTED, e);
  KJ_EXPECT(contains(e.getDescription(), "(it began with \"2\")"), e);
  env.settle(5 * kj::MILLISECONDS);
  auto& s = pool.getStats();
  KJ_EXPECT(s.retries == 1 && s.connectionsOpened == 2, s.retries, s.connectionsOpened);
  KJ_EXPECT(s.droppedUnsolicitedBytes == 2 && s.dropped() == 2, s.droppedUnsolicitedBytes,
      s.dropped());
  KJ_EXPECT(pool.getOpenCount() == 0);
  for (auto& peer: peers) {
    KJ_EXPECT(bytesBeforeEnd(env, peer->getStream()).orDefault(1) == 0,
        "a request was written to a server that spoke first");
  }
}

// =================================================================================================
// Sound: connector (8)

KJ_TEST("sound: a proxy's 502/504 is DISCONNECTED, 503/429 OVERLOADED, 403 FAILED; the pool does "
        "not retry a connect that failed") {
  struct Case {
    kj::StringPtr answer;
    Type type;
  };
  Case cases[] = {
    {"HTTP/1.1 502 Bad Gateway\r\n\r\n"_kj, Type::DISCONNECTED},
    {"HTTP/1.1 504 Gateway Timeout\r\n\r\n"_kj, Type::DISCONNECTED},
    {"HTTP/1.1 503 Service Unavailable\r\n\r\n"_kj, Type::OVERLOADED},
    {"HTTP/1.1 429 Too Many Requests\r\n\r\n"_kj, Type::OVERLOADED},
    {"HTTP/1.1 403 Forbidden\r\n\r\n"_kj, Type::FAILED},
  };
  for (auto& c: cases) {
    KJ_CONTEXT(c.answer);
    test::LoopEnv env;
    unsigned calls = 0;
    kj::Vector<kj::Own<test::Peer>> proxies;
    kj::Own<kj::TaskSet::ErrorHandler> ignore = kj::heap<IgnoreAll>();
    kj::TaskSet tasks(*ignore);
    auto connector = tunnelConnector([&]() {
      ++calls;
      auto t = test::pipeTransport();
      auto proxy = kj::heap<test::Peer>(env.ws, kj::mv(t.server));
      auto& stream = proxy->getStream();
      auto buffer = kj::heapArray<char>(4096);
      auto read = stream.tryRead(buffer.begin(), 1, buffer.size());
      tasks.add(read.then([&stream, answer = c.answer](size_t) {
        return writeAll(stream, answer.asBytes());
      }).attach(kj::mv(buffer)));
      proxies.add(kj::mv(proxy));
      return kj::Promise<kj::Own<kj::AsyncIoStream>>(kj::mv(t.client));
    }, "origin.test:443");
    ConnectionPool pool(env.timer, env.table, kj::mv(connector));
    auto req = pool.request(kj::HttpMethod::GET, "/", env.headers());
    auto e = env.failureOf(kj::mv(req.response));
    KJ_EXPECT(e.getType() == c.type, e);
    KJ_EXPECT(calls == 1, calls);
    KJ_EXPECT(pool.getStats().retries == 0 && pool.getStats().connectFailures == 1);
  }
}

// =================================================================================================
// Sound: bodilessRequestBody() (9)

KJ_TEST("sound: the bodiless request body is one shared object for fetcher and pool; empty writes "
        "pass, others fail FAILED saying to pass expectedBodySize; it outlives everything") {
  kj::Own<kj::AsyncOutputStream> fromFetcher;
  kj::Own<kj::AsyncOutputStream> fromPool;
  {
    FetcherEnv env(false);
    auto req = env.fetcher->request(kj::HttpMethod::GET, "/", env.headers());
    fromFetcher = kj::mv(req.body);
    ConnectionPool pool(env.timer, env.table, []() -> kj::Promise<kj::Own<kj::AsyncIoStream>> {
      return KJ_EXCEPTION(DISCONNECTED, "none");
    });
    auto poolReq = pool.request(kj::HttpMethod::HEAD, "/", env.headers());
    fromPool = kj::mv(poolReq.body);
    KJ_EXPECT(fromFetcher.get() == fromPool.get());
    KJ_EXPECT(fromFetcher.get() == StreamFetcher::bodilessRequestBody().get());
    env.bounded(fromFetcher->write("", 0));
    auto e = KJ_ASSERT_NONNULL(test::failureIfAny(env, fromPool->write("x", 1)));
    KJ_EXPECT(e.getType() == Type::FAILED && contains(e.getDescription(), "expectedBodySize"), e);
  }
  // Everything else is gone; the body still works (and its failures need no event loop to exist).
  KJ_EXPECT(fromFetcher.get() == fromPool.get());
}

}  // namespace
}  // namespace sockfetch
