import Foundation
import JWTKit
import Synchronization

/// Why a destination turned a migration token away.
public enum TokenRefusal: Error, CustomStringConvertible, Equatable {
    case missing
    case malformed(String)
    /// The signature does not verify with the destination's key: forged, altered, or signed by another issuer.
    case forged
    case expired(Date)
    /// Issued later than now by more than the allowed clock skew.
    case notYetValid(Date)
    case replayed(String)
    /// A claim names another VM or host than the migration's: (claim, in the token, actual).
    case mismatched(String, token: String, actual: String)
    /// The used-token ledger could not be read or written.
    case ledger(String)

    public var description: String {
        switch self {
        case .missing: "this destination takes a migration only with a token (tern migrate --token TOKEN; tern token issue makes one)"
        case .malformed(let reason): "the migration token is malformed: \(reason)"
        case .forged: "the migration token's signature does not verify with this destination's key (forged, altered, or from another issuer)"
        case .expired(let date): "the migration token expired at \(ISO8601DateFormatter().string(from: date))"
        case .notYetValid(let date): "the migration token is issued in the future (\(ISO8601DateFormatter().string(from: date))): are the clocks apart?"
        case .replayed(let id): "the migration token \(id) was used before: a token is good for one migration"
        case .mismatched(let claim, let token, let actual): "the migration token is for \(claim) '\(token)', not '\(actual)'"
        case .ledger(let reason): "cannot record used tokens: \(reason)"
        }
    }
}

/// Issues migration tokens: Ed25519-signed JWTs (RFC 8037's EdDSA) of `MigrationClaims`.
public struct TokenIssuer: Sendable {
    public let key: EdDSA.PrivateKey

    public init(key: EdDSA.PrivateKey) { self.key = key }

    public func issue(_ claims: MigrationClaims) async throws -> String {
        let keys = JWTKeyCollection()
        await keys.add(eddsa: key)
        return try await keys.sign(claims, header: JWTHeader(fields: ["typ": .string("JWT")]))
    }

    /// `issue` for a thread outside Swift's concurrency pool (the command line).
    public func issueBlocking(_ claims: MigrationClaims) throws -> String {
        try awaitResult { try await self.issue(claims) }
    }
}

/// A destination's check of a token (`tern run --incoming ... --require-token KEY`): signed by the
/// issuer's key, not expired, naming this VM, this source and this destination, and never used before.
public struct TokenVerifier: Sendable {
    public let key: EdDSA.PublicKey
    public let ledger: UsedTokenLedger
    /// How far the issuer's clock may run ahead of this host's.
    public static let clockSkew: TimeInterval = 60

    public init(key: EdDSA.PublicKey, ledger: UsedTokenLedger) {
        self.key = key
        self.ledger = ledger
    }

    /// Checks `token` for a migration of `vm`; `isSource`/`isDestination` say whether a name is the peer's
    /// (as its certificate proves) or this host's. Spends the token when every check passes.
    public func accept(_ token: String, vm: String, sourceName: String, isSource: (String) -> Bool,
                       destinationName: String, isDestination: (String) -> Bool,
                       now: Date = Date()) async throws(TokenRefusal) -> MigrationClaims {
        let claims = try await verifiedClaims(token)
        if now >= claims.expiry { throw .expired(claims.expiry) }
        if claims.issuedAt > now.addingTimeInterval(Self.clockSkew) { throw .notYetValid(claims.issuedAt) }
        if claims.vm != vm { throw .mismatched("VM", token: claims.vm, actual: vm) }
        if !isSource(claims.source) { throw .mismatched("source", token: claims.source, actual: sourceName) }
        if !isDestination(claims.destination) { throw .mismatched("destination", token: claims.destination, actual: destinationName) }
        try ledger.spend(claims)
        return claims
    }

    /// The claims of a token whose signature verifies with `key`.
    public func verifiedClaims(_ token: String) async throws(TokenRefusal) -> MigrationClaims {
        guard !token.isEmpty else { throw .missing }
        guard token.utf8.count <= 4096, token.split(separator: ".", omittingEmptySubsequences: false).count == 3 else {
            throw .malformed("not a JWT (three base64url parts)")
        }
        do {
            let keys = JWTKeyCollection()
            await keys.add(eddsa: key)
            return try await keys.verify(token, as: MigrationClaims.self)
        } catch let error as JWTError {
            switch error.errorType {
            case .signatureVerificationFailed, .unknownKID, .unsupportedAlgorithm, .signingAlgorithmFailure: throw .forged
            default: throw .malformed(error.reason ?? "\(error.errorType)")
            }
        } catch {
            throw .malformed("\(error)")
        }
    }

    /// `accept` for a thread outside Swift's concurrency pool (a destination's accept loop).
    public func acceptBlocking(_ token: String, vm: String, sourceName: String, isSource: @escaping @Sendable (String) -> Bool,
                               destinationName: String, isDestination: @escaping @Sendable (String) -> Bool) throws(TokenRefusal) -> MigrationClaims {
        do {
            return try awaitResult {
                try await self.accept(token, vm: vm, sourceName: sourceName, isSource: isSource,
                                      destinationName: destinationName, isDestination: isDestination)
            }
        } catch let refusal as TokenRefusal {
            throw refusal
        } catch {
            throw .malformed("\(error)")
        }
    }

    /// A token's claims without checking its signature: what a source shows of the token it presents.
    public static func unverifiedClaims(_ token: String) throws(TokenRefusal) -> MigrationClaims {
        do {
            return try awaitResult { try await JWTKeyCollection().unverified(token, as: MigrationClaims.self) }
        } catch {
            throw .malformed("\(error)")
        }
    }
}

/// Runs `body` to completion from a thread outside Swift's concurrency pool (the command line, the
/// migration code's own threads), for jwt-kit's async interface. Never call it from a task: a pool
/// thread blocked on it can starve the task it waits for.
func awaitResult<T: Sendable>(_ body: @escaping @Sendable () async throws -> T) throws -> T {
    let outcome = OutcomeBox<T>()
    let done = DispatchSemaphore(value: 0)
    Task {
        do { outcome.set(.success(try await body())) } catch { outcome.set(.failure(error)) }
        done.signal()
    }
    done.wait()
    return try outcome.get().get()
}

private final class OutcomeBox<T: Sendable>: Sendable {
    private let value = Mutex<Result<T, any Error>?>(nil)
    func set(_ result: Result<T, any Error>) { value.withLock { $0 = result } }
    func get() -> Result<T, any Error> { value.withLock { $0! } }
}
