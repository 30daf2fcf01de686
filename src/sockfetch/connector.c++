#include "connector.h"

#include <sockfetch/kj-compat.h>

#include <kj/debug.h>
#include <kj/vector.h>
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

struct ProxyHandshake {
  kj::String target;
  kj::Own<kj::AsyncIoStream> stream;
  kj::Vector<kj::byte> received;
};

kj::Promise<kj::Own<kj::AsyncIoStream>> readProxyAnswer(kj::Own<ProxyHandshake> state) {
  // Reads until the end of the proxy's answer head, then judges it.
  auto& received = state->received;
  for (size_t i = 0; i + 4 <= received.size(); i++) {
    if (memcmp(received.begin() + i, "\r\n\r\n", 4) != 0) continue;
    auto head = kj::heapString(reinterpret_cast<const char*>(received.begin()), i);
    size_t lineEnd = 0;
    while (lineEnd < head.size() && head[lineEnd] != '\r') lineEnd++;
    auto statusLine = kj::heapString(head.begin(), lineEnd);
    bool valid = statusLine.startsWith("HTTP/1.") && statusLine.size() >= 12 &&
        statusLine[8] == ' ';
    if (!valid) {
      return KJ_EXCEPTION(FAILED, kj::str("the proxy answered CONNECT to ", state->target,
          " with something that is not HTTP (", statusLine, "); check the proxy address"));
    }
    if (statusLine[9] != '2') {
      return KJ_EXCEPTION(FAILED, kj::str("the proxy refused to open a tunnel to ",
          state->target, ": \"", statusLine.slice(9), "\"; check the proxy's access rules and "
          "credentials"));
    }
    if (i + 4 == received.size()) return kj::mv(state->stream);
    auto rest = kj::heapArray<kj::byte>(received.slice(i + 4, received.size()));
    return kj::Own<kj::AsyncIoStream>(
        kj::heap<PrefixedStream>(kj::mv(rest), kj::mv(state->stream)));
  }
  if (received.size() > MAX_PROXY_HEAD) {
    return KJ_EXCEPTION(FAILED, kj::str("the proxy's answer to CONNECT ", state->target,
        " is longer than ", MAX_PROXY_HEAD, " bytes; check the proxy address"));
  }
  auto chunk = kj::heapArray<kj::byte>(4096);
  auto promise = state->stream->tryRead(chunk.begin(), 1, chunk.size());
  return promise.then([state = kj::mv(state), chunk = kj::mv(chunk)](size_t n) mutable
      -> kj::Promise<kj::Own<kj::AsyncIoStream>> {
    if (n == 0) {
      return KJ_EXCEPTION(DISCONNECTED, kj::str("the proxy closed the connection before "
          "answering CONNECT ", state->target, "; check that it is an HTTP proxy"));
    }
    state->received.addAll(chunk.slice(0, n));
    return readProxyAnswer(kj::mv(state));
  });
}

}  // namespace

Connector addressConnector(kj::NetworkAddress& address) {
  return [&address]() { return address.connect(); };
}

Connector tunnelConnector(Connector toProxy, kj::StringPtr target) {
  return [toProxy = kj::mv(toProxy), target = kj::heapString(target)]() mutable {
    return toProxy().then([target = kj::heapString(target)](
        kj::Own<kj::AsyncIoStream>&& stream) mutable {
      auto state = kj::heap<ProxyHandshake>();
      state->target = kj::mv(target);
      state->stream = kj::mv(stream);
      auto request = kj::str("CONNECT ", state->target, " HTTP/1.1\r\nHost: ", state->target,
          "\r\n\r\n");
      auto write = writeAll(*state->stream, request.asBytes());
      return write.attach(kj::mv(request)).then([state = kj::mv(state)]() mutable {
        return readProxyAnswer(kj::mv(state));
      });
    });
  };
}

}  // namespace sockfetch
