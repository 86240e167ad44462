import Foundation
import Testing
@testable import TernAuth

@Suite struct TokenTests {
    let directory: String
    let issuer: TokenIssuer
    let verifier: TokenVerifier

    init() throws {
        directory = NSTemporaryDirectory() + "tern-token-\(UUID().uuidString)"
        let paths = try TokenKeys.create(in: directory)
        issuer = TokenIssuer(key: try TokenKeys.loadPrivate(paths.privateKey))
        verifier = TokenVerifier(key: try TokenKeys.loadPublic(paths.publicKey),
                                 ledger: try UsedTokenLedger(path: directory + "/used-tokens"))
    }

    func claims(vm: String = "vm1", expiresIn seconds: TimeInterval = 60, issuedAt: Date = Date()) -> MigrationClaims {
        MigrationClaims(vm: vm, source: "src.example", destination: "dst.example", issuer: "test",
                        issuedAt: issuedAt, expiry: issuedAt.addingTimeInterval(seconds))
    }

    func accept(_ token: String, vm: String = "vm1", source: String = "src.example", destination: String = "dst.example",
                now: Date = Date()) async throws(TokenRefusal) -> MigrationClaims {
        try await verifier.accept(token, vm: vm, sourceName: source, isSource: { $0 == source },
                            destinationName: destination, isDestination: { $0 == destination }, now: now)
    }

    func refusal(_ body: () async throws -> Void) async -> TokenRefusal? {
        do { try await body() } catch let refusal as TokenRefusal { return refusal } catch { Issue.record("not a refusal: \(error)") }
        return nil
    }

    @Test func aTokenIsAcceptedOnceAndItsClaimsSurvive() async throws {
        let original = claims()
        let token = try await issuer.issue(original)
        let accepted = try await accept(token)
        #expect(accepted.tokenID == original.tokenID)
        #expect(accepted.vm == "vm1" && accepted.source == "src.example" && accepted.destination == "dst.example")
        #expect(abs(accepted.expiry.timeIntervalSince(original.expiry)) < 1)
        #expect(await refusal { _ = try await accept(token) } == .replayed(original.tokenID))
        // The ledger is a file: another destination process on this host sees the token spent too.
        let again = TokenVerifier(key: verifier.key, ledger: try UsedTokenLedger(path: verifier.ledger.path))
        #expect(try again.ledger.contains(original.tokenID))
    }

    @Test func expiredAndFutureTokensAreRefused() async throws {
        let expired = try await issuer.issue(claims(expiresIn: -1))
        guard case .expired = await refusal({ _ = try await accept(expired) }) else { Issue.record("an expired token was not refused"); return }
        let future = try await issuer.issue(claims(expiresIn: 600, issuedAt: Date().addingTimeInterval(300)))
        guard case .notYetValid = await refusal({ _ = try await accept(future) }) else { Issue.record("a token from the future was not refused"); return }
    }

    @Test func mismatchedClaimsAreRefusedWithoutSpendingTheToken() async throws {
        let token = try await issuer.issue(claims())
        #expect(await refusal { _ = try await accept(token, vm: "vm2") } == .mismatched("VM", token: "vm1", actual: "vm2"))
        #expect(await refusal { _ = try await accept(token, source: "other") } == .mismatched("source", token: "src.example", actual: "other"))
        #expect(await refusal { _ = try await accept(token, destination: "other") } == .mismatched("destination", token: "dst.example", actual: "other"))
        _ = try await accept(token)
    }

    @Test func forgedAndAlteredTokensAreRefused() async throws {
        let otherDirectory = directory + "/other"
        let other = TokenIssuer(key: try TokenKeys.loadPrivate(try TokenKeys.create(in: otherDirectory).privateKey))
        #expect(await refusal { _ = try await accept(try await other.issue(claims())) } == .forged)

        // The same signature over claims that name another VM.
        let token = try await issuer.issue(claims())
        let parts = token.split(separator: ".").map(String.init)
        let otherPayload = try await issuer.issue(claims(vm: "vm2")).split(separator: ".").map(String.init)[1]
        #expect(await refusal { _ = try await accept([parts[0], otherPayload, parts[2]].joined(separator: "."), vm: "vm2") } == .forged)

        // An unsigned token ("alg": "none") is not a signed one.
        let none = Data(#"{"alg":"none","typ":"JWT"}"#.utf8).base64EncodedString()
            .replacingOccurrences(of: "=", with: "").replacingOccurrences(of: "+", with: "-").replacingOccurrences(of: "/", with: "_")
        let unsigned = await refusal { _ = try await accept("\(none).\(parts[1]).") }
        #expect(unsigned == .forged || { if case .malformed = unsigned { return true }; return false }())
    }

    @Test func garbageIsMalformedAndNothingIsMissing() async {
        #expect(await refusal { _ = try await accept("") } == .missing)
        for garbage in ["abc", "a.b.c", String(repeating: "x", count: 5000)] {
            guard case .malformed = await refusal({ _ = try await accept(garbage) }) else { Issue.record("\(garbage.prefix(10)) was not malformed"); continue }
        }
    }

    @Test func keysAreNotOverwrittenAndBadKeysAreNamed() async throws {
        #expect(throws: TokenKeyError.self) { try TokenKeys.create(in: directory) }
        let bad = directory + "/bad.pem"
        try "not a key".write(toFile: bad, atomically: true, encoding: .utf8)
        #expect(throws: TokenKeyError.self) { try TokenKeys.loadPublic(bad) }
        #expect(throws: TokenKeyError.self) { try TokenKeys.loadPrivate(directory + "/missing") }
        var status = stat()
        stat(directory + "/" + TokenKeys.privateKeyFile, &status)
        #expect(status.st_mode & 0o077 == 0)
    }
}
