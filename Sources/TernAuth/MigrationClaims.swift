import Foundation
import JWTKit

/// What a migration token grants: one VM, moved once, from one host to another, before it expires.
/// Encoded as a JWT's claims: `jti` (the token's id, which makes it single-use), `sub` (the VM),
/// `src` (the source host's name, as its certificate proves it), `aud` (the destination's),
/// `iss` (who issued it), `iat` and `exp`.
public struct MigrationClaims: JWTPayload, Equatable {
    public var tokenID: String
    public var vm: String
    public var source: String
    public var destination: String
    public var issuer: String
    public var issuedAt: Date
    public var expiry: Date

    public init(tokenID: String = UUID().uuidString.lowercased(), vm: String, source: String, destination: String,
                issuer: String, issuedAt: Date = Date(), expiry: Date) {
        self.tokenID = tokenID
        self.vm = vm
        self.source = source
        self.destination = destination
        self.issuer = issuer
        self.issuedAt = issuedAt
        self.expiry = expiry
    }

    enum CodingKeys: String, CodingKey {
        case tokenID = "jti", vm = "sub", source = "src", destination = "aud", issuer = "iss", issuedAt = "iat", expiry = "exp"
    }

    public init(from decoder: any Decoder) throws {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        tokenID = try container.decode(IDClaim.self, forKey: .tokenID).value
        vm = try container.decode(SubjectClaim.self, forKey: .vm).value
        source = try container.decode(String.self, forKey: .source)
        // RFC 7519 lets `aud` be one string or an array; a migration token names exactly one destination.
        let audience = try container.decode(AudienceClaim.self, forKey: .destination).value
        guard audience.count == 1, let destination = audience.first else {
            throw DecodingError.dataCorruptedError(forKey: .destination, in: container, debugDescription: "a migration token names one destination")
        }
        self.destination = destination
        issuer = try container.decode(IssuerClaim.self, forKey: .issuer).value
        issuedAt = try container.decode(IssuedAtClaim.self, forKey: .issuedAt).value
        expiry = try container.decode(ExpirationClaim.self, forKey: .expiry).value
    }

    public func encode(to encoder: any Encoder) throws {
        var container = encoder.container(keyedBy: CodingKeys.self)
        try container.encode(IDClaim(value: tokenID), forKey: .tokenID)
        try container.encode(SubjectClaim(value: vm), forKey: .vm)
        try container.encode(source, forKey: .source)
        try container.encode(destination, forKey: .destination)
        try container.encode(IssuerClaim(value: issuer), forKey: .issuer)
        try container.encode(IssuedAtClaim(value: issuedAt), forKey: .issuedAt)
        try container.encode(ExpirationClaim(value: expiry), forKey: .expiry)
    }

    /// The signature is all jwt-kit checks; expiry, single use and the parties are checked by
    /// `TokenVerifier` against its own clock, so that each refusal says which one failed.
    public func verify(using algorithm: some JWTAlgorithm) async throws {}
}
