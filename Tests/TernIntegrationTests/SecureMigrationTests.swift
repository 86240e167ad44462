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

        init(cmdline: String, memory: String) throws {
            hosts = try TestHosts()
            certificates = try TestCertificates()
            address = "tcp:\(hosts.destinationAddress):\(freePort())"
            destination = try TernProcess(["run", "--incoming", address, "--serial", "off"] + TestChannel.tls.destinationArguments(certificates),
                                          wrapper: hosts.destinationHost)
            source = try TernProcess.guest(cmdline, memory: memory, wrapper: hosts.sourceHost)
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
