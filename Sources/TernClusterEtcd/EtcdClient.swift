import AsyncHTTPClient
import Foundation
import NIOCore
import NIOHTTP1

/// etcd's v3 API through its JSON gateway (etcd 3.4 and later: POST /v3/...), with
/// async-http-client. Keys and values are bytes (base64 in the JSON), 64-bit numbers
/// strings, as the gateway's mapping of etcd's protocol buffers has them. Each call
/// tries the endpoints in turn.
public final class EtcdClient: Sendable {
    public let endpoints: [String]
    public let timeout: TimeAmount
    private let http = HTTPClient.shared

    public init(endpoints: [String], timeout: TimeAmount = .seconds(3)) throws(EtcdError) {
        guard !endpoints.isEmpty else { throw .configuration("no etcd endpoint") }
        for endpoint in endpoints where !(endpoint.hasPrefix("http://") || endpoint.hasPrefix("https://")) || URL(string: endpoint)?.host == nil {
            throw .configuration("etcd endpoint '\(endpoint)' is not http://HOST:PORT")
        }
        self.endpoints = endpoints.map { $0.hasSuffix("/") ? String($0.dropLast()) : $0 }
        self.timeout = timeout
    }

    // MARK: The gateway's messages (only the fields Tern uses)

    // The gateway's JSON names are the protocol buffers' (snake_case, but "ID" and "TTL" as they are),
    // so the keys are spelled out rather than converted.
    struct KeyValue: Codable {
        var key: String
        var value: String?
        var createRevision: String?
        var lease: String?
        enum CodingKeys: String, CodingKey { case key, value, createRevision = "create_revision", lease }
    }
    struct PutRequest: Codable { var key: String; var value: String; var lease: String? }
    struct RangeRequest: Codable {
        var key: String
        var rangeEnd: String?
        enum CodingKeys: String, CodingKey { case key, rangeEnd = "range_end" }
    }
    struct RangeResponse: Codable { var kvs: [KeyValue]? }
    struct DeleteRangeRequest: Codable {
        var key: String
        var rangeEnd: String?
        enum CodingKeys: String, CodingKey { case key, rangeEnd = "range_end" }
    }
    struct Compare: Codable {
        var key: String
        var target: String
        var result: String = "EQUAL"
        var value: String?
        var createRevision: String?
        enum CodingKeys: String, CodingKey { case key, target, result, value, createRevision = "create_revision" }
    }
    struct RequestOp: Codable {
        var requestPut: PutRequest?
        var requestRange: RangeRequest?
        var requestDeleteRange: DeleteRangeRequest?
        enum CodingKeys: String, CodingKey { case requestPut = "request_put", requestRange = "request_range", requestDeleteRange = "request_delete_range" }
    }
    struct TxnRequest: Codable { var compare: [Compare]; var success: [RequestOp]; var failure: [RequestOp] }
    struct ResponseOp: Codable {
        var responseRange: RangeResponse?
        enum CodingKeys: String, CodingKey { case responseRange = "response_range" }
    }
    struct TxnResponse: Codable { var succeeded: Bool?; var responses: [ResponseOp]? }
    struct LeaseGrantRequest: Codable { var TTL: String; var ID: String = "0" }
    struct LeaseGrantResponse: Codable { var ID: String?; var TTL: String?; var error: String? }
    struct LeaseRequest: Codable { var ID: String }
    struct KeepAliveResponse: Codable { struct Result: Codable { var ID: String?; var TTL: String? }; var result: Result? }
    struct Empty: Codable {}

    private static let encoder = JSONEncoder()
    private static let decoder = JSONDecoder()

    static func bytes(_ text: String) -> String { Data(text.utf8).base64EncodedString() }
    static func bytes(_ data: Data) -> String { data.base64EncodedString() }

    /// The key just past every key that starts with `prefix` (etcd's range_end for a prefix).
    static func prefixEnd(_ prefix: String) -> String {
        var bytes = Array(prefix.utf8)
        while let last = bytes.last {
            if last < 0xFF { bytes[bytes.count - 1] = last + 1; return Data(bytes).base64EncodedString() }
            bytes.removeLast()
        }
        return Data([0]).base64EncodedString()
    }

    func call<Request: Encodable, Response: Decodable>(_ path: String, _ body: Request, as: Response.Type) throws(EtcdError) -> Response {
        let payload: Data
        do { payload = try Self.encoder.encode(body) } catch { throw .protocolError("cannot encode \(path): \(error)") }
        var failures: [String] = []
        for endpoint in endpoints {
            do {
                var headers = HTTPHeaders()
                headers.add(name: "Content-Type", value: "application/json")
                let request = try HTTPClient.Request(url: endpoint + path, method: .POST, headers: headers, body: .bytes(payload))
                let response = try http.execute(request: request, deadline: .now() + timeout).wait()
                let data = response.body.map { Data($0.readableBytesView) } ?? Data()
                guard response.status == .ok else {
                    failures.append("\(endpoint): \(response.status.code) \(String(decoding: data.prefix(200), as: UTF8.self))")
                    continue
                }
                do { return try Self.decoder.decode(Response.self, from: data) } catch {
                    throw EtcdError.protocolError("\(endpoint)\(path): unexpected answer \(String(decoding: data.prefix(200), as: UTF8.self))")
                }
            } catch let error as EtcdError {
                throw error
            } catch {
                failures.append("\(endpoint): \(error)")
            }
        }
        throw .unavailable(failures.joined(separator: "; "))
    }

    // MARK: Operations

    public func put(_ key: String, _ value: Data, lease: Int64? = nil) throws(EtcdError) {
        _ = try call("/v3/kv/put", PutRequest(key: Self.bytes(key), value: Self.bytes(value), lease: lease.map(String.init)), as: Empty.self)
    }

    /// Every key under `prefix`, with its value, in key order.
    public func range(prefix: String) throws(EtcdError) -> [(key: String, value: Data)] {
        let response = try call("/v3/kv/range", RangeRequest(key: Self.bytes(prefix), rangeEnd: Self.prefixEnd(prefix)), as: RangeResponse.self)
        return (response.kvs ?? []).compactMap { kv in
            guard let key = Data(base64Encoded: kv.key) else { return nil }
            return (String(decoding: key, as: UTF8.self), kv.value.flatMap { Data(base64Encoded: $0) } ?? Data())
        }
    }

    public func get(_ key: String) throws(EtcdError) -> Data? {
        let response = try call("/v3/kv/range", RangeRequest(key: Self.bytes(key)), as: RangeResponse.self)
        return response.kvs?.first.map { $0.value.flatMap { Data(base64Encoded: $0) } ?? Data() }
    }

    public func delete(_ key: String) throws(EtcdError) {
        _ = try call("/v3/kv/deleterange", DeleteRangeRequest(key: Self.bytes(key)), as: Empty.self)
    }

    /// Puts `value` at `key` only while `guardKey` holds `expected` (a fenced write); false if it did not.
    public func put(_ key: String, _ value: Data, onlyIf guardKey: String, holds expected: Data) throws(EtcdError) -> Bool {
        let request = TxnRequest(compare: [Compare(key: Self.bytes(guardKey), target: "VALUE", value: Self.bytes(expected))],
                                 success: [RequestOp(requestPut: PutRequest(key: Self.bytes(key), value: Self.bytes(value)))], failure: [])
        return try call("/v3/kv/txn", request, as: TxnResponse.self).succeeded == true
    }

    public func delete(_ key: String, onlyIf guardKey: String, holds expected: Data) throws(EtcdError) -> Bool {
        let request = TxnRequest(compare: [Compare(key: Self.bytes(guardKey), target: "VALUE", value: Self.bytes(expected))],
                                 success: [RequestOp(requestDeleteRange: DeleteRangeRequest(key: Self.bytes(key)))], failure: [])
        return try call("/v3/kv/txn", request, as: TxnResponse.self).succeeded == true
    }

    /// Creates `key` = `value` under `lease` if no such key exists. Returns whether it did, and the value there now.
    public func create(_ key: String, _ value: Data, lease: Int64) throws(EtcdError) -> (created: Bool, current: Data?) {
        let request = TxnRequest(compare: [Compare(key: Self.bytes(key), target: "CREATE", createRevision: "0")],
                                 success: [RequestOp(requestPut: PutRequest(key: Self.bytes(key), value: Self.bytes(value), lease: String(lease)))],
                                 failure: [RequestOp(requestRange: RangeRequest(key: Self.bytes(key)))])
        let response = try call("/v3/kv/txn", request, as: TxnResponse.self)
        if response.succeeded == true { return (true, value) }
        let current = response.responses?.first?.responseRange?.kvs?.first?.value.flatMap { Data(base64Encoded: $0) }
        return (false, current)
    }

    public func grantLease(ttl: Int) throws(EtcdError) -> Int64 {
        let response = try call("/v3/lease/grant", LeaseGrantRequest(TTL: String(ttl)), as: LeaseGrantResponse.self)
        guard let id = response.ID.flatMap({ Int64($0) }), response.error == nil else {
            throw .protocolError("lease grant refused: \(response.error ?? "no ID")")
        }
        return id
    }

    /// Renews `lease`; false once it has expired (etcd answers without a TTL).
    public func keepAlive(_ lease: Int64) throws(EtcdError) -> Bool {
        let response = try call("/v3/lease/keepalive", LeaseRequest(ID: String(lease)), as: KeepAliveResponse.self)
        return (response.result?.TTL.flatMap { Int($0) } ?? 0) > 0
    }

    public func revoke(_ lease: Int64) throws(EtcdError) {
        _ = try call("/v3/lease/revoke", LeaseRequest(ID: String(lease)), as: Empty.self)
    }
}

public enum EtcdError: Error, CustomStringConvertible {
    case configuration(String)
    case unavailable(String)
    case protocolError(String)
    /// A fenced write found that this controller no longer leads.
    case notLeader(String?)

    public var description: String {
        switch self {
        case .configuration(let why): why
        case .unavailable(let why): "etcd is unreachable: \(why)"
        case .protocolError(let why): "etcd: \(why)"
        case .notLeader(let leader): "this controller is not the leader" + (leader.map { " (the leader is \($0))" } ?? " (no leader elected yet)")
        }
    }
}
