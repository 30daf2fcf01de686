#pragma once
// The environment of test suites that drive one StreamFetcher: the fetcher on the client end of
// one connection (an in-process pipe or loopback TCP, optionally under the TLS-like wrapper), a
// scripted server on the other.

#include <sockfetch/stream-fetcher.h>
#include <sockfetch/test-util.h>

namespace sockfetch {
namespace test {

constexpr kj::StringPtr OK_HELLO = "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"_kj;

struct FetcherEnv: public LoopEnv {
  kj::Own<StreamFetcher> fetcher;
  kj::Own<Peer> peer;
  bool tcp;
  bool tls;

  explicit FetcherEnv(bool tcp, bool tls = false): tcp(tcp), tls(tls) {
    auto transport = tcp ? tcpTransport(io) : pipeTransport();
    if (tls) transport.client = tlsLike(kj::mv(transport.client));
    fetcher = kj::heap<StreamFetcher>(kj::mv(transport.client), table, settings());
    peer = kj::heap<Peer>(ws, kj::mv(transport.server));
  }

  StreamFetcher::Settings settings() {
    StreamFetcher::Settings s;
    s.timer = timer;
    return s;
  }

  struct Started {
    kj::HttpClient::Response response;
    kj::Promise<void> written;  // the server's write (a pipe completes it only once read)
    kj::String request;         // what the server received
  };

  Started start(kj::HttpMethod method, kj::StringPtr url, kj::StringPtr reply,
      StreamFetcher* on = nullptr) {
    // Sends a bodiless request, has the server answer `reply`, and waits for the response head.
    auto& f = on == nullptr ? *fetcher : *on;
    auto h = headers();
    auto req = f.request(method, url, h);
    req.body = nullptr;
    auto request = peer->readRequest();
    auto written = peer->sendLater(reply);
    auto response = bounded(kj::mv(req.response));
    return Started{kj::mv(response), kj::mv(written), kj::mv(request)};
  }

  void roundTrip(kj::StringPtr url = "/again", StreamFetcher* on = nullptr) {
    // One complete exchange that must work (the connection was kept, and is in step).
    auto s = start(kj::HttpMethod::GET, url, OK_HELLO, on);
    KJ_EXPECT(s.request.startsWith(kj::str("GET ", url, " HTTP/1.1\r\n")), s.request);
    KJ_EXPECT(s.response.statusCode == 200);
    KJ_EXPECT(bounded(s.response.body->readAllText()) == "hello");
    bounded(kj::mv(s.written));
  }

  kj::StringPtr why() {
    KJ_IF_SOME(reason, fetcher->getCloseReason()) return reason;
    return "(not closed)";
  }

  size_t read(kj::AsyncInputStream& in, void* buffer, size_t minBytes, size_t maxBytes) {
    return bounded(kj::evalNow([&]() { return in.tryRead(buffer, minBytes, maxBytes); }));
  }

  bool peerSawEnd() {
    // The server's side of the connection ends (FIN or reset) within the limit.
    return drainsToEnd(*peer);
  }
};

inline kj::String header(const kj::HttpHeaders& headers, kj::StringPtr name) {
  // A response header's value by name ("(absent)" if none).
  kj::String value = kj::str("(absent)");
  headers.forEach([&](kj::StringPtr n, kj::StringPtr v) {
    if (n == name) value = kj::str(v);
  });
  return value;
}

}  // namespace test
}  // namespace sockfetch
