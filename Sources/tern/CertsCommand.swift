import ArgumentParser
import Foundation
import TernTLS

struct Certs: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Make certificates for mutual TLS between tern hosts.", subcommands: [Initialize.self])

    struct Initialize: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "init",
            abstract: "Write DIR/ca.pem, cert.pem and key.pem (what --tls-dir reads) for a host named --name.",
            discussion: """
                Without --ca, a new CA is made in DIR (its key in DIR/ca-key.pem, to sign more hosts).
                With --ca CADIR, the host certificate is signed by the CA in CADIR and its ca.pem is copied:
                    tern certs init /etc/tern/a --name host-a
                    tern certs init /etc/tern/b --name host-b --ca /etc/tern/a
                """)

        @Argument(help: "The directory to write (created, mode 0700).")
        var directory: String

        @Option(help: "The host's name: the certificate's common name and subject alternative name (DNS, or IP for an address).")
        var name: String

        @Option(help: "A directory holding the CA (ca.pem, ca-key.pem) to sign with.")
        var ca: String?

        @Option(help: "Days the host certificate is valid.")
        var days: Int = 825

        @Flag(help: ArgumentHelp("Make a host certificate that expired yesterday (for tests of the refusal).", visibility: .hidden))
        var expired = false

        func run() throws {
            guard days > 0 else { throw ValidationError("--days must be positive") }
            do {
                try CertificateAuthority.initialize(directory: directory, name: name, caDirectory: ca,
                                                    validity: expired ? .init(notBefore: -10, notAfter: -1) : .init(notAfter: days))
            } catch {
                FileHandle.standardError.write(Data("tern: \(error)\n".utf8))
                throw ExitCode.failure
            }
            print("\(directory): ca.pem, cert.pem, key.pem for '\(name)'\(ca == nil ? " (and a new CA, ca-key.pem)" : ", signed by \(ca!)")")
        }
    }
}
