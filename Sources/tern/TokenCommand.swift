import ArgumentParser
import Foundation
import TernAuth
import TernMachine
import TernMigration

struct Token: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Make and issue per-migration tokens (what `tern run --incoming --require-token` asks for).",
        subcommands: [Initialize.self, Issue.self, Inspect.self])

    struct Initialize: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "init",
            abstract: "Write a new Ed25519 signing key: DIR/token.key (the issuer's, mode 0600) and DIR/token.pub (for destinations' --require-token).")

        @Argument(help: "The directory to write (created if missing).")
        var directory: String

        func run() throws {
            do {
                let paths = try TokenKeys.create(in: directory)
                print("\(paths.privateKey): signs tokens (tern token issue --key)\n\(paths.publicKey): checks them (tern run --incoming ... --require-token)")
            } catch {
                fail("\(error)")
            }
        }
    }

    struct Issue: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Print a signed token that lets one VM move once, from one host to another, before it expires.",
            discussion: """
                The hosts are named as their TLS certificates name them (`tern certs init DIR --name HOST`);
                the VM as `tern run --name` named it (`tern info` shows it). For example:
                    token=$(tern token issue --key keys/token.key --vm web1 --source host-a --destination host-b)
                    tern migrate --api-socket a.sock --to tcp:host-b:4444 --tls-dir /etc/tern/a --token "$token"
                """)

        @Option(help: "The issuer's private key (token.key from `tern token init`).")
        var key: String

        @Option(help: "The VM's name.")
        var vm: String

        @Option(help: "The source host's name, as its certificate proves it.")
        var source: String

        @Option(help: "The destination host's name, as its certificate proves it.")
        var destination: String

        @Option(help: "Seconds the token is valid.")
        var ttl: Int = 300

        @Option(help: "Who issues the token (its iss claim).")
        var issuer: String = "tern token issue"

        func validate() throws {
            guard ttl > 0 else { throw ValidationError("--ttl must be positive") }
            if let problem = MachineConfiguration.problem(withName: vm) { throw ValidationError("--vm: \(problem)") }
            guard !source.isEmpty, !destination.isEmpty else { throw ValidationError("--source and --destination name hosts") }
        }

        func run() throws {
            do {
                let issuer = TokenIssuer(key: try TokenKeys.loadPrivate(key))
                let now = Date()
                print(try issuer.issueBlocking(MigrationClaims(vm: vm, source: source, destination: destination, issuer: self.issuer,
                                                               issuedAt: now, expiry: now.addingTimeInterval(TimeInterval(ttl)))))
            } catch {
                fail("\(error)")
            }
        }
    }

    struct Inspect: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Print a token's claims (without checking its signature).")

        @Argument(help: "The token.")
        var token: String

        func run() throws {
            do {
                let claims = try TokenVerifier.unverifiedClaims(token)
                let dates = ISO8601DateFormatter()
                print("""
                    id           \(claims.tokenID)
                    vm           \(claims.vm)
                    source       \(claims.source)
                    destination  \(claims.destination)
                    issuer       \(claims.issuer)
                    issued       \(dates.string(from: claims.issuedAt))
                    expires      \(dates.string(from: claims.expiry))
                    """)
            } catch {
                fail("\(error)")
            }
        }
    }
}

/// A destination's `--require-token`: the token must be signed by the issuer's key, unexpired, unused,
/// and name this VM, the source the TLS session proved, and this host's own certificate.
struct TokenAuthorizer: MigrationAuthorizer {
    let verifier: TokenVerifier

    init(publicKey: String, ledger: String) throws {
        verifier = TokenVerifier(key: try TokenKeys.loadPublic(publicKey), ledger: try UsedTokenLedger(path: ledger))
    }

    func authorize(token: String, vm: String, over connection: Connection?) throws -> String {
        guard let session = connection?.session else {
            throw TokenRefusal.malformed("a token names hosts as their certificates prove them: this connection has no TLS")
        }
        return try verifier.acceptBlocking(token, vm: vm, sourceName: session.peerName, isSource: { session.peerMatches($0) },
                                           destinationName: session.localName, isDestination: { session.localMatches($0) }).tokenID
    }

    /// Where used tokens are recorded unless --token-ledger says: beside nothing the user must manage.
    static var defaultLedger: String {
        let environment = ProcessInfo.processInfo.environment
        let state = environment["XDG_STATE_HOME"] ?? ((environment["HOME"] ?? "/root") + "/.local/state")
        return state + "/tern/used-tokens"
    }
}
