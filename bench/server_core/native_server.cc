// A gRPC server in C++ (grpc's callback API), for measurement only: the broker does not ship it.
//
// It answers two calls on one Unix socket:
//   grpc.health.v1.Health/Check   the empty call: what a native server core costs per request;
//   broker.v1.Broker/MintToken    a native mint: claims JSON, ES256 with OpenSSL, one audit line per
//                                 mint written with write(2), the response. No attestation and no
//                                 policy (this core cannot see the caller: that is the front door's
//                                 job), and names are not JSON-escaped: it bounds what a native hot
//                                 path would cost, it is not one.
//
// Usage: native_server SOCKET_PATH AUDIT_PATH; prints "ready PUBLIC_KEY_HEX" once listening.
#include <fcntl.h>
#include <unistd.h>

#include <cstdio>
#include <ctime>
#include <memory>
#include <string>

#include <grpcpp/grpcpp.h>
#include <openssl/ecdsa.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <openssl/x509.h>

#include "broker/v1/broker.grpc.pb.h"
#include "health.grpc.pb.h"

namespace {

using grpc::health::v1::Health;
using grpc::health::v1::HealthCheckRequest;
using grpc::health::v1::HealthCheckResponse;

std::string B64Url(const unsigned char* data, size_t n) {
  static const char kAlphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
  std::string out;
  out.reserve((n * 4 + 2) / 3);
  size_t i = 0;
  for (; i + 2 < n; i += 3) {
    unsigned v = (data[i] << 16) | (data[i + 1] << 8) | data[i + 2];
    out += kAlphabet[v >> 18];
    out += kAlphabet[(v >> 12) & 63];
    out += kAlphabet[(v >> 6) & 63];
    out += kAlphabet[v & 63];
  }
  if (i + 1 == n) {
    unsigned v = data[i] << 16;
    out += kAlphabet[v >> 18];
    out += kAlphabet[(v >> 12) & 63];
  } else if (i + 2 == n) {
    unsigned v = (data[i] << 16) | (data[i + 1] << 8);
    out += kAlphabet[v >> 18];
    out += kAlphabet[(v >> 12) & 63];
    out += kAlphabet[(v >> 6) & 63];
  }
  return out;
}

std::string B64Url(const std::string& s) {
  return B64Url(reinterpret_cast<const unsigned char*>(s.data()), s.size());
}

class HealthImpl final : public Health::CallbackService {
  grpc::ServerUnaryReactor* Check(grpc::CallbackServerContext* context, const HealthCheckRequest*,
                                  HealthCheckResponse* response) override {
    response->set_status(HealthCheckResponse::SERVING);
    grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
    reactor->Finish(grpc::Status::OK);
    return reactor;
  }
};

class MintImpl final : public broker::v1::Broker::CallbackService {
 public:
  MintImpl(EVP_PKEY* key, int audit_fd)
      : key_(key), audit_fd_(audit_fd), header_(B64Url(R"({"alg":"ES256","kid":"k1","typ":"JWT"})")) {}

  grpc::ServerUnaryReactor* MintToken(grpc::CallbackServerContext* context,
                                      const broker::v1::MintTokenRequest* request,
                                      broker::v1::MintTokenResponse* response) override {
    grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
    unsigned char random[16];
    if (RAND_bytes(random, sizeof random) != 1) {
      reactor->Finish(grpc::Status(grpc::StatusCode::INTERNAL, "no randomness"));
      return reactor;
    }
    const std::string jti = B64Url(random, sizeof random);
    const long now = static_cast<long>(std::time(nullptr));
    const std::string& audience = request->audience().empty() ? request->tool() : request->audience();
    const std::string claims =
        R"({"iss":"spiffe://example.org","sub":"spiffe://example.org/workflow/)" + request->workflow() +
        R"(","aud":")" + audience + R"(","iat":)" + std::to_string(now) + R"(,"nbf":)" +
        std::to_string(now) + R"(,"exp":)" + std::to_string(now + 300) + R"(,"jti":")" + jti +
        R"(","tenant":"acme","wf":")" + request->workflow() + R"(","tool":")" + request->tool() +
        R"(","act":[],"dst":[]})";
    std::string token = header_ + "." + B64Url(claims);
    std::string signature;
    if (!Sign(token, &signature)) {
      reactor->Finish(grpc::Status(grpc::StatusCode::INTERNAL, "signing failed"));
      return reactor;
    }
    token += "." + signature;
    const std::string line = R"({"time":)" + std::to_string(now) + R"(,"event":"mint","workflow":")" +
                             request->workflow() + R"(","tool":")" + request->tool() + R"(","jti":")" + jti +
                             R"(","decision":"allow"})" + "\n";
    if (write(audit_fd_, line.data(), line.size()) != static_cast<ssize_t>(line.size())) {
      reactor->Finish(grpc::Status(grpc::StatusCode::INTERNAL, "audit write failed"));
      return reactor;
    }
    response->set_token(token);
    response->set_jti(jti);
    response->set_issued_at(now);
    response->set_expires_at(now + 300);
    reactor->Finish(grpc::Status::OK);
    return reactor;
  }

 private:
  // ES256: ECDSA P-256 over SHA-256, the DER signature re-encoded as r || s (RFC 7518, 3.4).
  bool Sign(const std::string& input, std::string* out) {
    std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)> ctx(EVP_MD_CTX_new(), EVP_MD_CTX_free);
    unsigned char der[80];
    size_t der_len = sizeof der;
    if (!ctx || EVP_DigestSignInit(ctx.get(), nullptr, EVP_sha256(), nullptr, key_) != 1 ||
        EVP_DigestSign(ctx.get(), der, &der_len, reinterpret_cast<const unsigned char*>(input.data()),
                       input.size()) != 1) {
      return false;
    }
    const unsigned char* p = der;
    std::unique_ptr<ECDSA_SIG, decltype(&ECDSA_SIG_free)> sig(d2i_ECDSA_SIG(nullptr, &p, der_len),
                                                             ECDSA_SIG_free);
    unsigned char rs[64];
    if (!sig || BN_bn2binpad(ECDSA_SIG_get0_r(sig.get()), rs, 32) != 32 ||
        BN_bn2binpad(ECDSA_SIG_get0_s(sig.get()), rs + 32, 32) != 32) {
      return false;
    }
    *out = B64Url(rs, sizeof rs);
    return true;
  }

  EVP_PKEY* key_;
  int audit_fd_;
  std::string header_;
};

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s SOCKET_PATH AUDIT_PATH\n", argv[0]);
    return 2;
  }
  EVP_PKEY* key = EVP_EC_gen("P-256");
  int audit_fd = open(argv[2], O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
  if (key == nullptr || audit_fd < 0) {
    std::fprintf(stderr, "cannot create the key or open the audit file\n");
    return 1;
  }
  HealthImpl health;
  MintImpl mint(key, audit_fd);
  grpc::ServerBuilder builder;
  builder.AddListeningPort(std::string("unix:") + argv[1], grpc::InsecureServerCredentials());
  builder.RegisterService(&health);
  builder.RegisterService(&mint);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (!server) {
    return 1;
  }
  // The public key (DER SubjectPublicKeyInfo, hex) lets the runner check a minted token really verifies.
  unsigned char* spki = nullptr;
  int spki_len = i2d_PUBKEY(key, &spki);
  if (spki_len <= 0) {
    return 1;
  }
  std::printf("ready ");
  for (int i = 0; i < spki_len; ++i) {
    std::printf("%02x", spki[i]);
  }
  std::printf("\n");
  std::fflush(stdout);
  OPENSSL_free(spki);
  server->Wait();
  return 0;
}
