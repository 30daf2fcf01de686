#include "stream-fetcher.h"

#include <sockfetch/kj-compat.h>
#include <sockfetch/test-tls.h>
#include <sockfetch/test-util.h>

#include <kj/compat/tls.h>
#include <kj/debug.h>
#include <kj/test.h>

namespace sockfetch {
namespace {

// StreamFetcher over kj's real TLS stream (kj-tls, OpenSSL): it exposes its socket's descriptor,
// reads the socket ahead of what it returns and reports reads several events late, so it is
// watched like any wrapped stream, never by asking the kernel.


constexpr kj::StringPtr OK_HELLO = "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"_kj;

struct TlsEnv {
  // A TLS connection over loopback TCP: a StreamFetcher on the client end, a scripted peer on the
  // server end. Members in dependency order.
  kj::AsyncIoContext io = kj::setupAsyncIo();
  kj::WaitScope& ws = io.waitScope;
  kj::Timer& timer = io.provider->getTimer();
  test::TlsContexts tls;
  kj::HttpHeaderTable table;
  kj::Own<StreamFetcher> fetcher;
  kj::Own<test::Peer> peer;

  TlsEnv() {
    auto transport = test::tcpTransport(io);
    auto server = tls.server->wrapServer(kj::mv(transport.server));
    auto client = tls.client->wrapClient(kj::mv(transport.client), "localhost").wait(ws);
    StreamFetcher::Settings settings;
    settings.timer = timer;
    fetcher = kj::heap<StreamFetcher>(kj::mv(client), table, kj::mv(settings));
    peer = kj::heap<test::Peer>(ws, server.wait(ws));
  }

  kj::HttpClient::Request get() {
    kj::HttpHeaders headers(table);
    headers.set(kj::HttpHeaderId::HOST, "localhost");
    return fetcher->request(kj::HttpMethod::GET, "/", headers);
  }

  kj::String exchange(kj::StringPtr response) {
    auto request = get();
    request.body = nullptr;
    peer->readRequest();
    auto sent = peer->sendLater(response);
    auto r = request.response.wait(ws);
    auto body = r.body->readAllText().wait(ws);
    sent.wait(ws);
    return body;
  }

  template <typename T>
  T waitAtMost(kj::Promise<T> promise) {
    return promise.exclusiveJoin(timer.afterDelay(2 * kj::SECONDS).then([]() -> T {
      KJ_FAIL_ASSERT("timed out");
    })).wait(ws);
  }
};

KJ_TEST("StreamFetcher reuses one TLS connection, from the first request after the handshake") {
  TlsEnv env;
  for (int i = 0; i < 50; i++) {
    KJ_EXPECT(env.exchange(OK_HELLO) == "hello");
    KJ_EXPECT(env.fetcher->getState() == StreamFetcher::State::IDLE, env.fetcher->getCloseKind());
    if (i % 10 == 9) env.timer.afterDelay(2 * kj::MILLISECONDS).wait(env.ws);  // idle a while
  }
  KJ_EXPECT(env.fetcher->getCompletedRequests() == 50);
}

KJ_TEST("StreamFetcher over TLS never takes a response sent while idle as the next one") {
  TlsEnv env;
  KJ_EXPECT(env.exchange(OK_HELLO) == "hello");
  env.timer.afterDelay(2 * kj::MILLISECONDS).wait(env.ws);
  // The server times the idle connection out; the next request comes from a timer reported in
  // the same poll as those bytes.
  env.peer->send("HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n\r\n");
  kj::Maybe<kj::HttpClient::Request> started;
  kj::Maybe<kj::Exception> refused;
  env.timer.afterDelay(0 * kj::MILLISECONDS).then([&]() {
    refused = kj::runCatchingExceptions([&]() { started = env.get(); });
  }).wait(env.ws);
  KJ_IF_SOME(request, started) {
    request.body = nullptr;
    KJ_EXPECT_THROW_MESSAGE("poisoned", env.waitAtMost(kj::mv(request.response)));
  } else {
    KJ_EXPECT(strstr(KJ_ASSERT_NONNULL(refused).getDescription().cStr(), "poisoned") != nullptr);
  }
  KJ_EXPECT(env.fetcher->getCloseKind() == StreamFetcher::CloseKind::UNSOLICITED_BYTES);
  KJ_EXPECT(env.peer->sawEof(), "a request was written after the server's 408");
}

KJ_TEST("StreamFetcher over TLS drops a connection whose server sent more than the response") {
  TlsEnv env;
  auto first = env.get();
  first.body = nullptr;
  env.peer->readRequest();
  auto body = kj::heapString(3000);
  for (auto& c: body) c = 'x';
  env.peer->send("HTTP/1.1 200 OK\r\nContent-Length: 3000\r\n\r\n");
  auto response = env.waitAtMost(kj::mv(first.response));
  // The body and a second response in one TLS write: OpenSSL holds the extra bytes.
  auto sent = env.peer->sendLater(kj::str(body, "HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nbad"));
  auto second = response.body->readAllText().then([&](kj::String text) {
    KJ_EXPECT(text == body);
    auto request = env.get();  // at once, from the body's own continuation
    request.body = nullptr;
    return request.response.then([](kj::HttpClient::Response&& r) {
      return r.body->readAllText().attach(kj::mv(r.body));
    });
  });
  KJ_EXPECT_THROW_MESSAGE("poisoned", env.waitAtMost(kj::mv(second)));
  sent.wait(env.ws);
  KJ_EXPECT(env.fetcher->getCloseKind() == StreamFetcher::CloseKind::UNSOLICITED_BYTES);
}

KJ_TEST("StreamFetcher over TLS notices the server closing the idle connection") {
  TlsEnv env;
  KJ_EXPECT(env.exchange(OK_HELLO) == "hello");
  env.peer->close();
  auto deadline = env.timer.now() + 2 * kj::SECONDS;
  while (env.fetcher->getState() == StreamFetcher::State::IDLE && env.timer.now() < deadline) {
    env.timer.afterDelay(1 * kj::MILLISECONDS).wait(env.ws);
  }
  KJ_EXPECT(env.fetcher->getState() == StreamFetcher::State::CLOSED);
  KJ_EXPECT_THROW(DISCONNECTED, env.get());
}

}  // namespace
}  // namespace sockfetch
