import Foundation
import TernAuth
import TernCluster

/// The controller signs each migration's token (TernAuth: Ed25519 JWT naming the VM,
/// the source and the destination), which the destination's `--require-token` checks.
struct TokenAuthority: MigrationTokenIssuer {
    let issuer: TokenIssuer
    let name: String

    func token(vm: String, source: String, destination: String, lifetime: Double) throws -> String {
        try issuer.issueBlocking(MigrationClaims(vm: vm, source: source, destination: destination, issuer: name,
                                                 expiry: Date(timeIntervalSinceNow: lifetime)))
    }
}
