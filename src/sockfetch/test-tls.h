#pragma once
// TLS for tests: a self-signed "localhost" keypair and the contexts that use it. Testonly.

#include <kj/compat/tls.h>
#include <kj/string.h>

namespace sockfetch {
namespace test {

constexpr kj::StringPtr KEY =
    "-----BEGIN PRIVATE KEY-----\n"
    "MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgwOnSBzvrvqcdgwc/\n"
    "bPvPr5FIur8MW07aJZeZW1vxBuyhRANCAASAj3eMBvnk1iYoxoLp+ROYJrN0nHIG\n"
    "0A8H7rdX4FdH2zAPMZcTs4TN+6mSJwDEpZ+Y6ZoVibKBXU2dI2KrRl5A\n"
    "-----END PRIVATE KEY-----\n"_kj;
constexpr kj::StringPtr CERT =
    "-----BEGIN CERTIFICATE-----\n"
    "MIIBlTCCATugAwIBAgIUbBVu8piqebL14LzfOVbpe1rygpAwCgYIKoZIzj0EAwIw\n"
    "FDESMBAGA1UEAwwJbG9jYWxob3N0MCAXDTI2MTEyNzA0NTk0MVoYDzIxMjYxMTAz\n"
    "MDQ1OTQxWjAUMRIwEAYDVQQDDAlsb2NhbGhvc3QwWTATBgcqhkjOPQIBBggqhkjO\n"
    "PQMBBwNCAASAj3eMBvnk1iYoxoLp+ROYJrN0nHIG0A8H7rdX4FdH2zAPMZcTs4TN\n"
    "+6mSJwDEpZ+Y6ZoVibKBXU2dI2KrRl5Ao2kwZzAdBgNVHQ4EFgQUfDCUAQfpHrCx\n"
    "QAyUBQ9OUdPmHdowHwYDVR0jBBgwFoAUfDCUAQfpHrCxQAyUBQ9OUdPmHdowDwYD\n"
    "VR0TAQH/BAUwAwEB/zAUBgNVHREEDTALgglsb2NhbGhvc3QwCgYIKoZIzj0EAwID\n"
    "SAAwRQIgVpBKSZRffVy9ovRZ4EjBpVFS5vhh49e/PF++677pvN8CIQDqV35r5OUm\n"
    "RYV+ms7tVxdxaFj8baNWt7wWPmc8OUlJ3Q==\n"
    "-----END CERTIFICATE-----\n"_kj;
// A self-signed test certificate (and its key) for "localhost", valid until 2126, made with:
//   openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 36500
//       -subj /CN=localhost -addext subjectAltName=DNS:localhost
// (one command line).

struct TlsContexts {
  // A server context with the test keypair, and a client context that trusts only it.
  kj::Own<kj::TlsContext> server;
  kj::Own<kj::TlsContext> client;

  TlsContexts() {
    kj::TlsContext::Options serverOptions;
    kj::TlsKeypair keypair{kj::TlsPrivateKey(KEY), kj::TlsCertificate(CERT)};
    serverOptions.defaultKeypair = keypair;
    server = kj::heap<kj::TlsContext>(kj::mv(serverOptions));
    kj::TlsContext::Options clientOptions;
    kj::TlsCertificate trusted(CERT);
    clientOptions.useSystemTrustStore = false;
    clientOptions.trustedCertificates = kj::arrayPtr(&trusted, 1);
    client = kj::heap<kj::TlsContext>(kj::mv(clientOptions));
  }
};

}  // namespace test
}  // namespace sockfetch
