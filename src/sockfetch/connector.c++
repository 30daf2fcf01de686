#include "connector.h"

#include <sockfetch/kj-compat.h>
#include <sockfetch/response-framer.h>

#include <kj/debug.h>
#include <kj/vector.h>
#include <errno.h>
#include <string.h>

namespace sockfetch {

namespace {

constexpr size_t MAX_PROXY_HEAD = 16 * 1024;

class PrefixedStream final: public kj::AsyncIoStream {
  // Returns `prefix` first, then the inner stream's bytes; writes go straight through.
public:
  PrefixedStream(kj::Array<kj::byte> prefix, kj::Own<kj::AsyncIoStream> inner)
      : prefix(kj::mv(prefix)), inner(kj::mv(inner)) {}

  kj::Promise<size_t> tryRead(void* buffer, size_t minBytes, size_t maxBytes) override {
    if (offset == prefix.size()) return inner->tryRead(buffer, minBytes, maxBytes);
    size_t n = kj::min(maxBytes, prefix.size() - offset);
    memcpy(buffer, prefix.begin() + offset, n);
    offset += n;
    if (n >= minBytes) return n;
    return inner->tryRead(reinterpret_cast<kj::byte*>(buffer) + n, minBytes - n, maxBytes - n)
        .then([n](size_t more) { return n + more; });
  }
  kj::Promise<void> write(const void* buffer, size_t size) override {
    return inner->write(buffer, size);
  }
  kj::Promise<void> write(kj::ArrayPtr<const kj::ArrayPtr<const kj::byte>> pieces) override {
    return inner->write(pieces);
  }
  kj::Promise<void> whenWriteDisconnected() override {
    return inner->whenWriteDisconnected();
  }
  void shutdownWrite() override {
    inner->shutdownWrite();
  }
  void abortRead() override {
    inner->abortRead();
  }
  kj::Maybe<int> getFd() const override {
    // While prefix bytes remain, asking the descriptor (MSG_PEEK) would not see them.
    if (offset < prefix.size()) return nullptr;
    return inner->getFd();
  }

private:
  kj::Array<kj::byte> prefix;
  size_t offset = 0;
  kj::Own<kj::AsyncIoStream> inner;
};

constexpr unsigned MAX_PROXY_INTERIM = 16;
// Interim (1xx) answers skipped before the proxy's final answer to CONNECT.

struct ProxyHandshake {
  kj::String target;
  kj::Own<kj::AsyncIoStream> stream;
  kj::Vector<kj::byte> received;
  size_t scanned = 0;  // where the search for the answer's end resumes: before it, no end
  unsigned interim = 0;
};

bool isHostAndPort(kj::StringPtr target) {
  // CONNECT takes host:port (RFC 9110 9.3.6); without the port a proxy answers 400. A host with
  // a colon (IPv6) is in brackets, or its last group would read as the port.
  KJ_IF_SOME(colon, target.findLast(':')) {
    auto host = target.slice(0, colon);
    auto port = target.slice(colon + 1);
    if (host.size() == 0 || port.size() == 0 || port.size() > 5) return false;
    uint32_t number = 0;
    for (char c: port) {
      if (c < '0' || c > '9') return false;
      number = number * 10 + (c - '0');
    }
    if (number == 0 || number > 65535) return false;
    if (host[0] == '[' || host[host.size() - 1] == ']') {
      // [v6 address]: brackets around it, and none inside.
      auto inside = host.slice(1, host.size() - 1);
      return host.size() > 2 && host[0] == '[' && host[host.size() - 1] == ']' &&
          memchr(inside.begin(), '[', inside.size()) == nullptr &&
          memchr(inside.begin(), ']', inside.size()) == nullptr;
    }
    return memchr(host.begin(), ':', host.size()) == nullptr &&
        memchr(host.begin(), '[', host.size()) == nullptr &&
        memchr(host.begin(), ']', host.size()) == nullptr;
  }
  return false;
}

kj::Exception proxyFailure(const kj::Exception& e, kj::StringPtr target) {
  // A failure of the connection to the proxy before its answer, said as such: in a pool it
  // would otherwise read like the origin failing a request.
  return kj::Exception(e.getType(), __FILE__, __LINE__, kj::str("the connection to the proxy "
      "failed before it answered CONNECT ", target, " (", e.getDescription(), "); check that the "
      "proxy is up and reachable"));
}

kj::Promise<kj::Own<kj::AsyncIoStream>> readProxyAnswer(kj::Own<ProxyHandshake> state) {
  // Reads until the end of the proxy's answer head, then judges it.
  auto& received = state->received;
  auto chars = reinterpret_cast<const char*>(received.begin());
  for (size_t i = state->scanned; i + 1 < received.size(); i++) {
    // The head ends with an empty line, CRLF or (as RFC 9112 2.2 lets a recipient accept) LF.
    if (received[i] != '\n') continue;
    size_t headEnd = headEndAfterLf(kj::arrayPtr(chars, received.size()), i);
    if (headEnd == 0) continue;
    size_t lineEnd = 0;
    while (chars[lineEnd] != '\r' && chars[lineEnd] != '\n') lineEnd++;
    auto statusLine = kj::heapString(chars, lineEnd);
    unsigned status = 0;
    KJ_IF_SOME(s, parseStatusCode(statusLine)) {
      status = s;
    } else {
      auto shown = statusLine.size() > 0 ? kj::str("(", statusLine, ")") : kj::str("(an empty "
          "line where its status line belongs)");
      return KJ_EXCEPTION(FAILED, kj::str("the proxy answered CONNECT to ", state->target,
          " with something that is not HTTP ", shown, "; check the proxy address"));
    }
    if (status < 200 && status != 101) {
      // Interim: skipped, as for any HTTP response (RFC 9110 15.2), up to a limit.
      if (++state->interim > MAX_PROXY_INTERIM) {
        return KJ_EXCEPTION(FAILED, kj::str("the proxy sent more than ", MAX_PROXY_INTERIM,
            " interim (1xx) answers to CONNECT ", state->target, "; check the proxy"));
      }
      auto rest = kj::heapArray<kj::byte>(received.slice(headEnd, received.size()));
      received.clear();
      received.addAll(rest);
      state->scanned = 0;
      return readProxyAnswer(kj::mv(state));
    }
    if (status == 502 || status == 504) {
      return KJ_EXCEPTION(DISCONNECTED, kj::str("the proxy could not reach ", state->target,
          " (\"", statusLine.slice(9), "\"); check that the target is up and reachable from the "
          "proxy"));
    }
    if (status == 503 || status == 429) {
      // "Try later": OVERLOADED, which kj's HttpServer answers with 503 in turn.
      return KJ_EXCEPTION(OVERLOADED, kj::str("the proxy is too busy to open a tunnel to ",
          state->target, " (\"", statusLine.slice(9), "\"); try again later"));
    }
    if (status == 407) {
      return KJ_EXCEPTION(FAILED, kj::str("the proxy asks for credentials to open a tunnel to ",
          state->target, " (\"", statusLine.slice(9), "\"), and tunnelConnector sends none; "
          "use a proxy that admits this client without them"));
    }
    if (status >= 300) {
      return KJ_EXCEPTION(FAILED, kj::str("the proxy refused to open a tunnel to ",
          state->target, ": \"", statusLine.slice(9), "\"; check the proxy's access rules and "
          "credentials"));
    }
    if (status < 200) {
      return KJ_EXCEPTION(FAILED, kj::str("the proxy answered CONNECT to ", state->target,
          " with \"", statusLine.slice(9), "\", which does not open a tunnel; check the proxy"));
    }
    if (headEnd == received.size()) return kj::mv(state->stream);
    auto rest = kj::heapArray<kj::byte>(received.slice(headEnd, received.size()));
    return kj::Own<kj::AsyncIoStream>(
        kj::heap<PrefixedStream>(kj::mv(rest), kj::mv(state->stream)));
  }
  // No end yet. Whether one begins at the last two bytes depends on what comes next (see
  // headEndAfterLf()): the search resumes there, not from the start.
  state->scanned = received.size() >= 2 ? received.size() - 2 : 0;
  if (received.size() > MAX_PROXY_HEAD) {
    return KJ_EXCEPTION(FAILED, kj::str("the proxy's answer to CONNECT ", state->target,
        " is longer than ", MAX_PROXY_HEAD, " bytes; check the proxy address"));
  }
  auto chunk = kj::heapArray<kj::byte>(4096);
  auto& stream = *state->stream;
  auto promise = kj::evalNow([&]() { return stream.tryRead(chunk.begin(), 1, chunk.size()); });
  return promise.catch_([target = kj::heapString(state->target)](kj::Exception&& e) -> size_t {
    kj::throwFatalException(proxyFailure(e, target));
  }).then([state = kj::mv(state), chunk = kj::mv(chunk)](size_t n) mutable
      -> kj::Promise<kj::Own<kj::AsyncIoStream>> {
    if (n == 0) {
      return KJ_EXCEPTION(DISCONNECTED, kj::str("the proxy closed the connection before "
          "answering CONNECT ", state->target, "; check that it is an HTTP proxy"));
    }
    state->received.addAll(chunk.slice(0, n));
    return readProxyAnswer(kj::mv(state));
  });
}

kj::StringPtr connectAdvice(kj::StringPtr failure) {
  // What to do about a failed connect, told by kj's message, which quotes strerror() (so the
  // comparison holds in any locale): running out of descriptors or memory is this process's
  // doing, not the server's.
  for (int error: {EMFILE, ENFILE}) {
    if (strstr(failure.cStr(), strerror(error)) != nullptr) {
      return "this process (or the system) has no file descriptor left: raise the limit "
          "(`ulimit -n`), or lower the pool's maxConnections and maxIdleConnections";
    }
  }
  for (int error: {ENOBUFS, ENOMEM}) {
    if (strstr(failure.cStr(), strerror(error)) != nullptr) {
      return "the system is short of memory for sockets: try again later, or open fewer "
          "connections";
    }
  }
  return "check that a server is running and listening at that address";
}

}  // namespace

Connector addressConnector(kj::NetworkAddress& address) {
  return [&address]() {
    return kj::evalNow([&]() { return address.connect(); })
        .catch_([&address](kj::Exception&& e) -> kj::Own<kj::AsyncIoStream> {
      // kj's own message ("connect(): Connection refused") names neither the address nor what
      // to do. The type stays: DISCONNECTED for a refusal, FAILED for a socket path not there.
      kj::throwFatalException(kj::Exception(e.getType(), __FILE__, __LINE__,
          kj::str("connecting to ", address.toString(), " failed (", e.getDescription(), "); ",
              connectAdvice(e.getDescription()))));
    });
  };
}

Connector tunnelConnector(Connector toProxy, kj::StringPtr target) {
  // The target goes into the request line and the Host header as it is: a space or a control
  // character (CR LF above all) would let it add headers, or a whole request, to the CONNECT.
  KJ_REQUIRE(target.size() > 0, "tunnelConnector needs a target, as host:port");
  for (char c: target) {
    KJ_REQUIRE(static_cast<unsigned char>(c) > ' ' && c != '\x7f',
        "tunnelConnector's target must be host:port, without spaces or control characters",
        target);
  }
  KJ_REQUIRE(isHostAndPort(target), "tunnelConnector's target must be host:port, with a port "
      "number from 1 to 65535 (an IPv6 address in brackets: [::1]:443)", target);
  return [toProxy = kj::mv(toProxy), target = kj::heapString(target)]() mutable {
    auto proxy = kj::evalNow([&]() { return toProxy(); })
        .catch_([target = kj::heapString(target)](kj::Exception&& e)
            -> kj::Own<kj::AsyncIoStream> {
      // Said as the proxy's failure: in a pool it would otherwise read like the origin's.
      kj::throwFatalException(kj::Exception(e.getType(), __FILE__, __LINE__, kj::str("could not "
          "reach the proxy to open a tunnel to ", target, ": ", e.getDescription())));
    });
    return proxy.then([target = kj::heapString(target)](
        kj::Own<kj::AsyncIoStream>&& stream) mutable {
      auto state = kj::heap<ProxyHandshake>();
      state->target = kj::mv(target);
      state->stream = kj::mv(stream);
      auto request = kj::str("CONNECT ", state->target, " HTTP/1.1\r\nHost: ", state->target,
          "\r\n\r\n");
      auto& proxy = *state->stream;
      auto write = kj::evalNow([&]() { return writeAll(proxy, request.asBytes()); });
      auto forError = kj::heapString(state->target);
      return write.attach(kj::mv(request)).then([state = kj::mv(state)]() mutable {
        return readProxyAnswer(kj::mv(state));
      }, [target = kj::mv(forError)](kj::Exception&& e)
          -> kj::Promise<kj::Own<kj::AsyncIoStream>> {
        return proxyFailure(e, target);
      });
    });
  };
}

}  // namespace sockfetch
