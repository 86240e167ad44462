import Foundation
import Glibc
import Testing
import TernAPI
import TernMachine
import TernMigration

/// Certificate directories made with `tern certs init`: a source and a destination of one CA.
final class TestCertificates: @unchecked Sendable {
    let root: String
    static let sourceName = "source.test", destinationName = "destination.test"

    init() throws {
        root = NSTemporaryDirectory() + "tern-certs-\(UUID().uuidString.prefix(8))"
        try make("source", name: Self.sourceName)
        try make("destination", name: Self.destinationName, ca: "source")
    }

    var source: String { root + "/source" }
    var destination: String { root + "/destination" }

    /// Another directory for `name`, signed by the CA in `ca` (nil: a CA of its own).
    @discardableResult
    func make(_ directory: String, name: String, ca: String? = nil, expired: Bool = false) throws -> String {
        let cli = try TernProcess(["certs", "init", root + "/" + directory, "--name", name] + (ca.map { ["--ca", root + "/" + $0] } ?? [])
                                  + (expired ? ["--expired"] : []), withAPI: false)
        guard cli.waitForExit(timeout: 20) == 0 else { throw ConfigurationError("tern certs init failed: \(cli.stderr)") }
        return root + "/" + directory
    }

    deinit { try? FileManager.default.removeItem(atPath: root) }
}

/// How a test's migration is protected: the options each side takes.
enum TestChannel: CustomStringConvertible, Sendable {
    case insecure
    case tls

    var description: String { self == .tls ? "tls" : "insecure" }

    func destinationArguments(_ certificates: TestCertificates?) -> [String] {
        self == .tls ? ["--tls-dir", certificates!.destination, "--tls-allow", TestCertificates.sourceName] : ["--insecure"]
    }

    func migrateArguments(_ certificates: TestCertificates?) -> [String] {
        self == .tls ? ["--tls-dir", certificates!.source, "--tls-allow", TestCertificates.destinationName] : ["--insecure"]
    }
}

/// Mutual TLS on every migration connection, across network namespaces: full
/// migrations, and each refusal with its reason, the source running on and the
/// destination still waiting for the real source.
@Suite(.serialized, .enabled(if: FileManager.default.isWritableFile(atPath: "/dev/kvm"), "needs /dev/kvm"),
       .enabled(if: TestHosts.canCreate, "needs network namespaces (root, iproute2)"))
struct SecureMigrationTests {
    /// Two namespace hosts: a TLS destination waiting on host b, and a guest running `cmdline` on host a.
    struct Setup {
        let hosts: TestHosts
        let certificates: TestCertificates
        let address: String
        let destination: TernProcess
        let source: TernProcess

        init(cmdline: String, memory: String, destinationExtra: (TestCertificates) -> [String] = { _ in [] }, sourceExtra: [String] = []) throws {
            hosts = try TestHosts()
            certificates = try TestCertificates()
            address = "tcp:\(hosts.destinationAddress):\(freePort())"
            destination = try TernProcess(["run", "--incoming", address, "--serial", "off"] + TestChannel.tls.destinationArguments(certificates)
                                          + destinationExtra(certificates), wrapper: hosts.destinationHost)
            source = try TernProcess.guest(cmdline, memory: memory, extra: sourceExtra, wrapper: hosts.sourceHost)
            try source.waitForAPI()
            let deadline = Date(timeIntervalSinceNow: 10)
            while !destination.stderr.contains("waiting for an incoming migration") && Date() < deadline { usleep(20_000) }
        }

        /// `tern migrate` from host a with `arguments`.
        func migrate(_ arguments: [String], to target: String? = nil) throws -> TernProcess {
            try TernProcess(["migrate", "--api-socket", source.apiSocket, "--to", target ?? address, "--json"] + arguments,
                            withAPI: false, wrapper: hosts.sourceHost)
        }
    }

    @Test(arguments: [["--streams", "2"], ["--mode", "hybrid", "--precopy-rounds", "1"], ["--mode", "postcopy"]])
    func aMigrationOverMutualTLSArrivesIntact(options: [String]) throws {
        let setup = try Setup(cmdline: "fill=32 dirty=16 pattern=random progress=0", memory: "128M")
        let (source, destination) = (setup.source, setup.destination)
        let before = try source.waitForStatus { $0.phase == .dirty }
        let cli = try setup.migrate(["--verify"] + TestChannel.tls.migrateArguments(setup.certificates) + options)
        #expect(cli.waitForExit(timeout: 90) == 0, "\(cli.stderr)")
        let r = try #require(try? APIJSON.decoder.decode(MigrationReport.self, from: Data(cli.stdout.utf8)), "\(cli.stderr)")
        #expect(r.status == .completed, "\(r.reason ?? "")")
        #expect(r.verification?.match == true)
        #expect(r.channel == ChannelReport(transport: "tls", tlsVersion: "TLSv1.3", cipher: "TLS_AES_128_GCM_SHA256", peer: TestCertificates.destinationName))
        #expect(destination.stderr.contains("the source is '\(TestCertificates.sourceName)' (TLSv1.3"), "\(destination.stderr)")
        #expect(source.waitForExit(timeout: 30) == 0)
        try destination.waitForAPI()
        let later = try destination.waitForStatus { $0.iterations > before.iterations && $0.verified > before.verified }
        #expect(later.errors == 0)
    }

    @Test func everyRefusalNamesItsReasonAndTheDestinationWaitsOn() throws {
        let setup = try Setup(cmdline: "dirty=8 progress=0", memory: "64M")
        let (hosts, certificates, source, destination) = (setup.hosts, setup.certificates, setup.source, setup.destination)
        _ = try source.waitForStatus { $0.phase == .dirty }

        let stranger = try certificates.make("stranger", name: TestCertificates.sourceName)            // another CA
        let expired = try certificates.make("expired", name: TestCertificates.sourceName, ca: "source", expired: true)
        let unnamed = try certificates.make("unnamed", name: "someone-else.test", ca: "source")        // a name not allowed
        let attempts: [(String, [String], String)] = [
            ("another CA", ["--tls-dir", stranger], "certificate verify failed"),
            ("an expired certificate", ["--tls-dir", expired], "alert certificate expired"),
            ("a name the destination does not allow", ["--tls-dir", unnamed], "the peer 'someone-else.test' is not allowed"),
            ("a destination that is not the one named", ["--tls-dir", certificates.source, "--tls-allow", "other.test"], "is not allowed"),
            ("a plaintext source at a TLS listener", ["--insecure"], "this destination takes migrations over mutual TLS only"),
        ]
        for (what, arguments, reason) in attempts {
            let cli = try setup.migrate(arguments)
            #expect(cli.waitForExit(timeout: 60) == 1, "\(what): \(cli.stderr)")
            let r = try? APIJSON.decoder.decode(MigrationReport.self, from: Data(cli.stdout.utf8))
            #expect(r?.status == .failed, "\(what)")
            #expect(reason.isEmpty || r?.reason?.contains(reason) == true, "\(what): \(r?.reason ?? cli.stderr)")
            let info = try APIJSON.decoder.decode(MachineInfo.self, from: try source.client.request(.GET, "/v1/vm").body)
            #expect(info.state == .running, "\(what): the source runs on")
            #expect(destination.process.isRunning, "\(what): the destination waits on")
        }
        #expect(destination.stderr.components(separatedBy: "refused a connection").count - 1 >= attempts.count, "\(destination.stderr)")

        // A TLS source at a destination that takes migrations in clear.
        let plainPort = freePort(), plainAddress = "tcp:\(hosts.destinationAddress):\(plainPort)"
        let plain = try TernProcess(["run", "--incoming", plainAddress, "--insecure", "--serial", "off"], wrapper: hosts.destinationHost)
        let plainDeadline = Date(timeIntervalSinceNow: 10)
        while !plain.stderr.contains("waiting for an incoming migration") && Date() < plainDeadline { usleep(20_000) }
        let tlsAtPlain = try setup.migrate(TestChannel.tls.migrateArguments(certificates), to: plainAddress)
        #expect(tlsAtPlain.waitForExit(timeout: 60) == 1)
        let refused = try? APIJSON.decoder.decode(MigrationReport.self, from: Data(tlsAtPlain.stdout.utf8))
        #expect(refused?.reason?.contains("TLS handshake failed") == true, "\(refused?.reason ?? tlsAtPlain.stderr)")
        #expect(plain.process.isRunning, "the plaintext destination waits on")
        let waitDeadline = Date(timeIntervalSinceNow: 10)
        while !plain.stderr.contains("refused a connection") && Date() < waitDeadline { usleep(20_000) }
        #expect(plain.stderr.contains("refused a connection"), "\(plain.stderr)")

        // The real source still gets through.
        let cli = try setup.migrate(["--verify"] + TestChannel.tls.migrateArguments(certificates))
        #expect(cli.waitForExit(timeout: 60) == 0, "\(cli.stderr)")
        #expect(source.waitForExit(timeout: 30) == 0)
    }

    /// Strangers that connect and then say nothing hold up only their own handshakes: the source behind
    /// them is secured and migrates at once (one after another, they would outlast its 10 s handshake).
    @Test func silentStrangersDoNotHoldUpTheSource() throws {
        let setup = try Setup(cmdline: "dirty=8 progress=0", memory: "64M")
        _ = try setup.source.waitForStatus { $0.phase == .dirty }
        guard case .tcp(let host, let port) = try Endpoint(parsing: setup.address) else { Issue.record("not tcp"); return }
        let strangers = try (0..<3).map { _ in try setup.hosts.sourceHostConnect(host: host, port: port) }
        defer { strangers.forEach { $0.terminate() } }
        usleep(300_000)
        let cli = try setup.migrate(["--verify"] + TestChannel.tls.migrateArguments(setup.certificates))
        #expect(cli.waitForExit(timeout: 60) == 0, "\(cli.stderr)")
        let r = try #require(try? APIJSON.decoder.decode(MigrationReport.self, from: Data(cli.stdout.utf8)), "\(cli.stderr)")
        #expect(r.status == .completed && r.verification?.match == true, "\(r.reason ?? "")")
        #expect(r.setupMs < ChannelSecurity.handshakeSeconds * 1000, "set up in \(r.setupMs) ms, not behind the strangers")
        #expect(setup.source.waitForExit(timeout: 30) == 0)
    }

    /// `tern token issue` with the test key.
    static func issue(key: String, vm: String = "vm-under-test", source: String = TestCertificates.sourceName,
                      destination: String = TestCertificates.destinationName, ttl: Int = 300) throws -> String {
        let cli = try TernProcess(["token", "issue", "--key", key, "--vm", vm, "--source", source, "--destination", destination,
                                   "--ttl", "\(ttl)"], withAPI: false)
        guard cli.waitForExit(timeout: 20) == 0 else { throw ConfigurationError("tern token issue failed: \(cli.stderr)") }
        return cli.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
    }

    @Test func aMigrationNeedsItsOwnUnusedSignedTokenAndTheDestinationWaitsOn() throws {
        let keys = NSTemporaryDirectory() + "tern-token-keys-\(UUID().uuidString.prefix(8))"
        let other = keys + "/other"
        defer { try? FileManager.default.removeItem(atPath: keys) }
        for directory in [keys, other] {
            let initialized = try TernProcess(["token", "init", directory], withAPI: false)
            #expect(initialized.waitForExit(timeout: 20) == 0, "\(initialized.stderr)")
        }
        let ledger = keys + "/used-tokens"
        let setup = try Setup(cmdline: "dirty=8 progress=0", memory: "64M",
                              destinationExtra: { _ in ["--require-token", keys + "/token.pub", "--token-ledger", ledger] },
                              sourceExtra: ["--name", "vm-under-test"])
        let (source, destination) = (setup.source, setup.destination)
        _ = try source.waitForStatus { $0.phase == .dirty }
        let key = keys + "/token.key"
        let good = try Self.issue(key: key)
        let attempts: [(String, [String], String)] = [
            ("no token", [], "takes a migration only with a token"),
            ("an expired token", ["--token", try Self.issue(key: key, ttl: 1)], "expired"),
            ("a token of another issuer", ["--token", try Self.issue(key: other + "/token.key")], "does not verify"),
            ("a token for another VM", ["--token", try Self.issue(key: key, vm: "another-vm")], "for VM 'another-vm'"),
            ("a token for another source", ["--token", try Self.issue(key: key, source: "elsewhere.test")], "for source 'elsewhere.test'"),
            ("a token for another destination", ["--token", try Self.issue(key: key, destination: "elsewhere.test")], "for destination 'elsewhere.test'"),
            ("a token that is not one", ["--token", "garbage"], "malformed"),
        ]
        sleep(2) // the one-second token has expired
        for (what, arguments, reason) in attempts {
            let cli = try setup.migrate(TestChannel.tls.migrateArguments(setup.certificates) + arguments)
            #expect(cli.waitForExit(timeout: 60) == 1, "\(what): \(cli.stderr)")
            let r = try? APIJSON.decoder.decode(MigrationReport.self, from: Data(cli.stdout.utf8))
            #expect(r?.status == .failed, "\(what)")
            #expect(r?.reason?.contains(reason) == true, "\(what): \(r?.reason ?? cli.stderr)")
            let info = try APIJSON.decoder.decode(MachineInfo.self, from: try source.client.request(.GET, "/v1/vm").body)
            #expect(info.state == .running, "\(what): the source runs on")
            #expect(destination.process.isRunning, "\(what): the destination waits on")
        }
        // The right token, from a file: the report names it.
        let tokenFile = keys + "/good.jwt"
        try good.write(toFile: tokenFile, atomically: true, encoding: .utf8)
        let cli = try setup.migrate(["--verify", "--token-file", tokenFile] + TestChannel.tls.migrateArguments(setup.certificates))
        #expect(cli.waitForExit(timeout: 60) == 0, "\(cli.stderr)")
        let r = try #require(try? APIJSON.decoder.decode(MigrationReport.self, from: Data(cli.stdout.utf8)), "\(cli.stderr)")
        let id = try Self.tokenID(good)
        #expect(r.channel?.tokenID == id)
        #expect(destination.stderr.contains("token \(id)"), "\(destination.stderr)")
        #expect(source.waitForExit(timeout: 30) == 0)
        try destination.waitForAPI()
        let moved = try APIJSON.decoder.decode(MachineInfo.self, from: try destination.client.request(.GET, "/v1/vm").body)
        #expect(moved.name == "vm-under-test", "the VM keeps its name")

        // The same token again, to a fresh destination sharing the ledger, from a source running a VM of that name: a replay.
        let replayAddress = "tcp:\(setup.hosts.destinationAddress):\(freePort())"
        let replayDestination = try TernProcess(["run", "--incoming", replayAddress, "--serial", "off", "--require-token", keys + "/token.pub",
                                                 "--token-ledger", ledger] + TestChannel.tls.destinationArguments(setup.certificates),
                                                wrapper: setup.hosts.destinationHost)
        let replaySource = try TernProcess.guest("dirty=8 progress=0", memory: "64M", extra: ["--name", "vm-under-test"], wrapper: setup.hosts.sourceHost)
        try replaySource.waitForAPI()
        let deadline = Date(timeIntervalSinceNow: 10)
        while !replayDestination.stderr.contains("waiting for an incoming migration") && Date() < deadline { usleep(20_000) }
        let replay = try TernProcess(["migrate", "--api-socket", replaySource.apiSocket, "--to", replayAddress, "--json", "--token", good]
                                     + TestChannel.tls.migrateArguments(setup.certificates), withAPI: false, wrapper: setup.hosts.sourceHost)
        #expect(replay.waitForExit(timeout: 60) == 1, "\(replay.stderr)")
        let refused = try? APIJSON.decoder.decode(MigrationReport.self, from: Data(replay.stdout.utf8))
        #expect(refused?.reason?.contains("was used before") == true, "\(refused?.reason ?? replay.stderr)")
        #expect(replayDestination.process.isRunning, "the destination waits on after a replay")
    }

    static func tokenID(_ token: String) throws -> String {
        let cli = try TernProcess(["token", "inspect", token], withAPI: false)
        guard cli.waitForExit(timeout: 20) == 0 else { throw ConfigurationError("tern token inspect failed: \(cli.stderr)") }
        let line = try #require(cli.stdout.split(separator: "\n").first { $0.hasPrefix("id") })
        return String(line.split(separator: " ").last!)
    }

    @Test func tokenOptionsAreCheckedBeforeAnythingRuns() throws {
        let noTLS = try TernProcess(["run", "--incoming", "unix:/tmp/x.sock", "--require-token", "/nonexistent.pub"], withAPI: false)
        #expect(noTLS.waitForExit() == 64)
        #expect(noTLS.stderr.contains("--require-token needs --tls-dir"), "\(noTLS.stderr)")
        let certificates = try TestCertificates()
        let missingKey = try TernProcess(["run", "--incoming", "tcp:127.0.0.1:\(freePort())", "--serial", "off", "--require-token", "/nonexistent.pub",
                                          "--token-ledger", NSTemporaryDirectory() + "tern-ledger-\(getpid())"]
                                         + TestChannel.tls.destinationArguments(certificates), withAPI: false)
        #expect(missingKey.waitForExit(timeout: 20) == 1)
        #expect(missingKey.stderr.contains("/nonexistent.pub"), "\(missingKey.stderr)")
        let badName = try TernProcess(["run", "--kernel", "/nonexistent", "--name", "bad name!"], withAPI: false)
        #expect(badName.waitForExit() == 64)
        #expect(badName.stderr.contains("a VM name has only"), "\(badName.stderr)")
        let bothTokens = try TernProcess(["migrate", "--api-socket", "/nonexistent.sock", "--to", "unix:/tmp/x", "--token", "a", "--token-file", "b"], withAPI: false)
        #expect(bothTokens.waitForExit() == 64)
    }

    @Test func aTCPMigrationInClearMustBeAskedFor() throws {
        let noTLS = try TernProcess(["run", "--incoming", "tcp:127.0.0.1:\(freePort())", "--serial", "off"])
        #expect(noTLS.waitForExit() == 64)
        #expect(noTLS.stderr.contains("needs --tls-dir DIR"), "\(noTLS.stderr)")
        let migrate = try TernProcess(["migrate", "--api-socket", "/nonexistent.sock", "--to", "tcp:127.0.0.1:1"], withAPI: false)
        #expect(migrate.waitForExit() == 64)
        #expect(migrate.stderr.contains("or --insecure"), "\(migrate.stderr)")
        let both = try TernProcess(["run", "--incoming", "tcp:127.0.0.1:1", "--insecure", "--tls-dir", "/tmp"], withAPI: false)
        #expect(both.waitForExit() == 64)
        let missing = try TernProcess(["run", "--incoming", "tcp:127.0.0.1:1", "--tls-dir", "/nonexistent/tls"], withAPI: false)
        #expect(missing.waitForExit() == 64)
        #expect(missing.stderr.contains("tern certs init"), "\(missing.stderr)")
        // A unix: socket relies on its file permissions.
        let unix = try TernProcess(["run", "--incoming", "unix:\(NSTemporaryDirectory())tern-\(getpid()).sock", "--serial", "off"])
        let deadline = Date(timeIntervalSinceNow: 10)
        while !unix.stderr.contains("waiting for an incoming migration") && Date() < deadline { usleep(20_000) }
        #expect(unix.process.isRunning && !unix.stderr.contains("--insecure"), "\(unix.stderr)")
    }
}
