import ArgumentParser
import Foundation
import Glibc
import Logging
import TernAPI
import TernMachine

struct Run: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Boot a kernel in a new VM and serve its API.")

    @Option(help: "Multiboot kernel image (ELF or a.out-kludge).")
    var kernel: String

    @Option(help: "Kernel command line.")
    var cmdline: String = ""

    @Option(help: "Guest RAM, e.g. 512M or 2G (binary units).")
    var memory: String = "512M"

    @Option(help: "Number of vCPUs.")
    var cpus: Int = 1

    @Option(help: "Serial console: stdout, file:PATH, socket:PATH or off.")
    var serial: String = "stdout"

    @Option(help: "Path of the Unix socket serving the HTTP/JSON API.")
    var apiSocket: String?

    @Flag(help: "Create the VM but leave its vCPUs paused.")
    var paused = false

    @Option(help: ArgumentHelp("KVM device node (for testing).", visibility: .hidden))
    var kvmDevice: String = "/dev/kvm"

    @Option(help: "Log level: trace, debug, info, notice, warning, error.")
    var logLevel: String = "info"

    func run() throws {
        let logger = bootstrapLogging(level: logLevel)
        do {
            let size = try ByteSize(parsing: memory)
            let configuration = MachineConfiguration(
                kernelPath: kernel, commandLine: cmdline, memorySize: size.bytes, vcpuCount: cpus,
                serial: try SerialTarget(parsing: serial), kvmPath: kvmDevice)
            // The API socket is claimed first so that a path in use fails before any VM exists.
            let server = try apiSocket.map { try APIServer.bind(path: $0, logger: logger) }
            let machine: Machine
            do {
                machine = try Machine(configuration: configuration, logger: logger)
            } catch {
                server?.shutdown()
                throw error
            }
            server?.attach(machine)
            installTerminationHandlers(machine)
            machine.start(paused: paused)
            let exit = machine.waitForExit()
            server?.shutdown()
            if exit.isFailure {
                FileHandle.standardError.write(Data("tern: \(exit)\n".utf8))
                throw ExitCode(2)
            }
        } catch let error as ExitCode {
            throw error
        } catch {
            FileHandle.standardError.write(Data("tern: \(error)\n".utf8))
            throw ExitCode.failure
        }
    }
}

/// SIGINT/SIGTERM end the VM cleanly (socket removed, threads joined) instead of killing the process mid-write.
private func installTerminationHandlers(_ machine: Machine) {
    for signalNumber in [SIGINT, SIGTERM] {
        signal(signalNumber, SIG_IGN)
        let source = DispatchSource.makeSignalSource(signal: signalNumber, queue: .global())
        source.setEventHandler {
            machine.requestExit(MachineExit(kind: .quit, message: "stopped by signal \(signalNumber)"))
        }
        source.resume()
        retainedSignalSources.append(source)
    }
}

nonisolated(unsafe) private var retainedSignalSources: [any DispatchSourceSignal] = []

func bootstrapLogging(level: String) -> Logger {
    let parsed = Logger.Level(rawValue: level) ?? .info
    LoggingSystem.bootstrap { label in
        var handler = StreamLogHandler.standardError(label: label)
        handler.logLevel = parsed
        return handler
    }
    return Logger(label: "tern")
}
