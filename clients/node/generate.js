#!/usr/bin/env node
// Calls Prism's Generate from Node.js with @grpc/grpc-js, the protos loaded at run time (they are
// the contract: nothing generated, nothing copied). Streams the tokens as they come.
//
//   node generate.js ADDRESS PROMPT [--max-new-tokens N] [--image FILE]... [--ignore-eos] [--traceparent TP]
//
// Prints one JSON line per streamed chunk ({"token_ids": [...], "text": "..."}) and a last line
// {"done": true, "request_id", "token_ids", "text", "finish_reason", "usage", "reductions"}.
// A failed call prints {"error": CODE_NAME, "details": ...} and exits with status 1.
// --traceparent joins the call to the caller's W3C trace (the scheduler's span is its child).
'use strict';

const fs = require('fs');
const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTOS = path.resolve(__dirname, '..', '..', 'protos');

function loadPrism() {
  const definition = protoLoader.loadSync('prism/v1/prism.proto', {
    includeDirs: [PROTOS], keepCase: true, longs: Number, enums: String, defaults: true, oneofs: true,
  });
  return grpc.loadPackageDefinition(definition).prism.v1;
}

function parseArgs(argv) {
  const out = { maxNewTokens: 16, images: [], traceparent: "", ignoreEos: false };
  const rest = [];
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === '--max-new-tokens') out.maxNewTokens = Number(argv[++i]);
    else if (a === '--image') out.images.push(argv[++i]);
    else if (a === "--traceparent") out.traceparent = argv[++i];
    else if (a === "--ignore-eos") out.ignoreEos = true;
    else rest.push(a);
  }
  if (rest.length !== 2 || !Number.isInteger(out.maxNewTokens) || out.maxNewTokens < 1) {
    throw new Error('usage: node generate.js ADDRESS PROMPT [--max-new-tokens N] [--image FILE]... [--ignore-eos] [--traceparent TP]');
  }
  [out.address, out.prompt] = rest;
  return out;
}

// Resolves with every chunk of one Generate stream; rejects with the gRPC error.
function generate(prism, address, request, traceparent, onChunk) {
  const client = new prism.PrismService(address, grpc.credentials.createInsecure());
  const metadata = new grpc.Metadata();
  if (traceparent) metadata.set('traceparent', traceparent);
  return new Promise((resolve, reject) => {
    const chunks = [];
    const call = client.Generate(request, metadata);
    call.on('data', (chunk) => { chunks.push(chunk); onChunk(chunk); });
    call.on('error', (err) => { client.close(); reject(err); });
    call.on('end', () => { client.close(); resolve(chunks); });
  });
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const prism = loadPrism();
  const request = {
    prompt: args.prompt,
    media: args.images.map((f) => ({ image: { data: fs.readFileSync(f) } })),
    sampling: { max_new_tokens: args.maxNewTokens, ignore_eos: args.ignoreEos },
  };
  try {
    const chunks = await generate(prism, args.address, request, args.traceparent, (c) => {
      if (c.token_ids.length) console.log(JSON.stringify({ token_ids: c.token_ids, text: c.text }));
    });
    const last = chunks[chunks.length - 1];
    console.log(JSON.stringify({
      done: true, request_id: last.request_id, token_ids: chunks.flatMap((c) => c.token_ids),
      text: chunks.map((c) => c.text).join(''), finish_reason: last.finish_reason, usage: last.usage,
      reductions: last.reductions,
    }));
  } catch (err) {
    const code = Object.keys(grpc.status).find((k) => grpc.status[k] === err.code) || String(err.code);
    console.log(JSON.stringify({ error: code, details: err.details }));
    process.exitCode = 1;
  }
}

if (require.main === module) {
  main().catch((err) => { console.error(err.message); process.exitCode = 2; });
}

module.exports = { loadPrism, generate };
