import ArgumentParser
import Foundation
import NIOHTTP1
import TernAPI
import TernDevices
import TernMachine

/// Options every command that talks to a running VM shares.
struct APIOptions: ParsableArguments {
    @Option(help: "The VM's API socket (as given to `tern run --api-socket`).")
    var apiSocket: String

    @Flag(help: "Print JSON instead of text.")
    var json = false

    var client: APIClient { APIClient(socketPath: apiSocket) }
}

/// Sends one request; turns transport failures and API errors into a one-line message and exit code 1.
func call(_ client: APIClient, _ method: HTTPMethod, _ uri: String, body: Data = Data(), expecting: Int) throws -> APIClient.Response {
    let response: APIClient.Response
    do {
        response = try client.request(method, uri, body: body)
    } catch {
        fail("\(error)")
    }
    guard response.status == expecting else {
        fail(response.errorMessage ?? "the API answered \(response.status)")
    }
    return response
}

/// Prints an API answer: its JSON as it came with --json, otherwise `table`, a rendering of it for people.
func printAnswer(_ body: Data, json: Bool, table: () throws -> String) rethrows {
    if json {
        FileHandle.standardOutput.write(body)
        print()
    } else {
        print(try table())
    }
}

func fail(_ message: String) -> Never {
    FileHandle.standardError.write(Data("tern: \(message)\n".utf8))
    Foundation.exit(1)
}

struct Info: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Show a VM's state.")
    @OptionGroup var api: APIOptions

    func run() throws {
        let response = try call(api.client, .GET, "/v1/vm", expecting: 200)
        try printAnswer(response.body, json: api.json) { InfoTable.render(try APIJSON.decoder.decode(MachineInfo.self, from: response.body)) }
    }
}

enum InfoTable {
    static func render(_ info: MachineInfo) -> String {
        var rows: [(String, String)] = [
            ("name", info.name ?? "-"),
            ("state", info.state.rawValue),
            ("memory", ByteSize(bytes: info.memoryBytes).description + (info.memoryHugePages == true ? " (huge pages)" : " (4 KiB pages)")),
            ("vcpus", "\(info.vcpus)"),
            ("uptime", String(format: "%.3f s", Double(info.uptimeMs) / 1000)),
            ("kernel", info.kernel),
            ("cmdline", info.cmdline),
            ("pid", "\(info.pid)"),
        ]
        if let exit = info.exit { rows.append(("exit", "\(exit.kind.rawValue): \(exit.message)")) }
        for device in info.devices ?? [] {
            let backend = switch device.kind {
            case "virtio-blk": "\(device.path ?? "?") (\(ByteSize(bytes: device.sizeBytes ?? 0))\(device.readOnly == true ? ", read-only" : ""))"
            default: "tap \(device.tap ?? "?"), mac \(device.mac ?? "?")"
            }
            let counters = device.counters.filter { $0.value > 0 }.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: " ")
            rows.append(("device", "\(device.id): \(device.kind) at 0x\(String(device.address, radix: 16)) irq \(device.interrupt), \(backend)\(counters.isEmpty ? "" : "; " + counters)"))
        }
        let width = rows.map(\.0.count).max() ?? 0
        return rows.map { $0.0.padding(toLength: width, withPad: " ", startingAt: 0) + "  " + $0.1 }.joined(separator: "\n")
    }
}

struct Pause: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Pause a VM's vCPUs.")
    @OptionGroup var api: APIOptions
    func run() throws { _ = try call(api.client, .PUT, "/v1/vm/pause", expecting: 204) }
}

struct Resume: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Resume a paused VM.")
    @OptionGroup var api: APIOptions
    func run() throws { _ = try call(api.client, .PUT, "/v1/vm/resume", expecting: 204) }
}

struct Quit: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Stop a VM and end its tern process.")
    @OptionGroup var api: APIOptions
    func run() throws { _ = try call(api.client, .PUT, "/v1/vm/quit", expecting: 204) }
}
