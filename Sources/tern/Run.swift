import ArgumentParser
import Foundation
import Glibc
import Logging
import TernAPI
import TernMachine

struct Run: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Boot a kernel in a new VM and serve its API.")

    @Option(help: "Multiboot kernel image (ELF or a.out-kludge).")
    var kernel: String?

    @Option(help: "Start from a snapshot file written by `tern snapshot` instead of booting a kernel.")
    var restore: String?

    @Option(help: "Kernel command line.")
    var cmdline: String = ""

    @Option(help: "Guest RAM, e.g. 512M or 2G (binary units; default 512M, or the snapshot's).")
    var memory: String?

    @Option(help: "Number of vCPUs (default 1, or the snapshot's).")
    var cpus: Int?

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

    func validate() throws {
        switch (kernel, restore) {
        case (nil, nil): throw ValidationError("give --kernel FILE to boot, or --restore FILE to resume a snapshot")
        case (.some, .some): throw ValidationError("--kernel and --restore exclude each other")
        case (nil, .some) where !cmdline.isEmpty: throw ValidationError("--cmdline cannot change a restored VM")
        default: break
        }
    }

    func run() throws {
        let logger = bootstrapLogging(level: logLevel)
        do {
            let size = try memory.map { try ByteSize(parsing: $0).bytes }
            let serialTarget = try SerialTarget(parsing: serial)
            // The API socket is claimed first so that a path in use fails before any VM exists.
            let server = try apiSocket.map { try APIServer.bind(path: $0, logger: logger) }
            let machine: Machine
            do {
                if let restore {
                    let statistics: SnapshotStatistics
                    (machine, statistics) = try Machine.restoring(from: restore, expectedMemory: size, expectedVcpus: cpus,
                                                                  serial: serialTarget, kvmPath: kvmDevice)
                    let megabytes = Double(statistics.fileBytes) / 1e6
                    logger.info("restored \(restore): \(String(format: "%.1f MB in %.3f s (%.0f MB/s)", megabytes, statistics.seconds, megabytes / max(statistics.seconds, 1e-9)))")
                } else {
                    let configuration = MachineConfiguration(
                        kernelPath: kernel, commandLine: cmdline, memorySize: size ?? 512 << 20, vcpuCount: cpus ?? 1,
                        serial: serialTarget, kvmPath: kvmDevice)
                    machine = try Machine(configuration: configuration, logger: logger)
                }
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
