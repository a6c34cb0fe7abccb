/**
 * The widget's styles, applied inside its shadow root only. Themeable with CSS custom properties set on the
 * element or any ancestor (custom properties inherit into a shadow tree): --fm-font, --fm-text, --fm-muted,
 * --fm-bg, --fm-accent, --fm-radius, --fm-border (and --fm-highlight, --fm-accent-text, --fm-focus). `all: initial`
 * on the host keeps the page's inherited properties (font, colour, line height, letter spacing …) out. Every control
 * shows a focus ring when reached by keyboard (`:focus-visible`), in --fm-focus (the accent unless set).
 */

const font = "var(--fm-font,system-ui,-apple-system,'Segoe UI',Roboto,'Helvetica Neue',Arial,sans-serif)";
const text = "var(--fm-text,#1f2937)";
const muted = "var(--fm-muted,#4b5563)";
const bg = "var(--fm-bg,#ffffff)";
const accent = "var(--fm-accent,#2563eb)";
const radius = "var(--fm-radius,12px)";
const border = "var(--fm-border,#d1d5db)";
const focus = `var(--fm-focus,${accent})`;

export const CSS = `
:host{all:initial;display:block;font-family:${font};font-size:14px;line-height:1.45;color:${text};text-align:start}
:host([hidden]){display:none}
:host([data-floating]){position:fixed;right:16px;bottom:16px;z-index:2147483000;width:min(360px,calc(100vw - 32px))}
*,*::before,*::after{box-sizing:border-box}
[hidden]{display:none!important}
.fm{background:${bg};color:${text};border:1px solid ${border};border-radius:${radius};padding:16px;outline:none}
:host([data-floating]) .fm{box-shadow:0 8px 28px rgba(15,23,42,.18);max-height:min(70vh,560px);overflow:auto;padding-top:8px}
.bar{display:flex;align-items:center;justify-content:space-between;gap:8px;margin-bottom:8px}
.bar-title{font-weight:600;color:${muted};font-size:13px}
p,h2,ol,ul{margin:0;padding:0}
h2{font-size:16px;font-weight:600;line-height:1.3;margin-bottom:8px}
.notice{color:${muted}}
.state-error .notice{color:${text};font-weight:600}
.muted{color:${muted}}
button{font:inherit;font-size:13px;color:var(--fm-accent-text,${accent});background:transparent;border:1px solid ${border};border-radius:calc(${radius} / 2);min-height:32px;min-width:32px;padding:4px 12px;cursor:pointer}
button:hover{border-color:${accent}}
button:focus-visible,.fm:focus-visible{outline:2px solid ${focus};outline-offset:2px}
.messages{list-style:none;display:grid;gap:8px;margin-bottom:16px}
.message{border:1px solid ${border};border-left:4px solid ${accent};border-radius:calc(${radius} / 2);padding:10px 12px;display:grid;gap:4px}
.subject{font-weight:600}
.body{white-space:pre-line;overflow-wrap:anywhere}
.message button{justify-self:end}
.banner{background:#ecfdf5;color:#065f46;border:1px solid #a7f3d0;border-radius:calc(${radius} / 2);padding:8px 12px;font-weight:600;margin-bottom:12px}
.track{height:8px;border-radius:999px;background:${border};overflow:hidden}
.fill{height:100%;width:0;background:${accent};border-radius:999px;transition:width .3s ease}
.progress-text{margin:6px 0 12px;font-size:13px}
.steps{list-style:none;display:grid;gap:4px}
.step{display:grid;grid-template-columns:20px 1fr;gap:8px;padding:8px;border-radius:calc(${radius} / 2);border:1px solid transparent}
.step[data-current]{background:var(--fm-highlight,rgba(37,99,235,.08));border-color:${accent}}
.icon{font-weight:700;text-align:center;line-height:1.45}
.step[data-status=completed] .icon{color:${accent}}
.step[data-status=completed] .step-title{text-decoration:line-through;text-decoration-color:${muted}}
.step[data-status=locked] .icon,.step[data-status=locked] .step-title{color:${muted}}
.step-title{font-weight:600;overflow-wrap:anywhere}
.desc,.waiting{font-size:13px;overflow-wrap:anywhere}
.tag{display:inline-block;margin-inline-start:6px;padding:0 6px;border:1px solid ${border};border-radius:999px;font-size:12px;font-weight:400;color:${muted}}
.sr-only{position:absolute;width:1px;height:1px;padding:0;margin:-1px;overflow:hidden;clip:rect(0 0 0 0);white-space:nowrap;border:0}
@media (prefers-reduced-motion:reduce){.fill{transition:none}}
`;
