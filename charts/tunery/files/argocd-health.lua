-- Argo CD health of a tunery.dev FineTuneJob, read from the conditions the operator keeps (docs/operator.md).
local hs = { status = "Progressing", message = "waiting for the operator" }
local status = obj.status
if status == nil then
  return hs
end
local conditions = {}
for _, condition in ipairs(status.conditions or {}) do
  conditions[condition.type] = condition
end
local ready = conditions["Ready"]
if ready ~= nil and ready.message ~= nil and ready.message ~= "" then
  hs.message = ready.message
end
-- Conditions of an older generation describe a spec that is no longer there.
if status.observedGeneration ~= nil and status.observedGeneration ~= obj.metadata.generation then
  hs.message = "waiting for the operator to observe generation " .. tostring(obj.metadata.generation)
  return hs
end
local stalled = conditions["Stalled"]
if (stalled ~= nil and stalled.status == "True") or status.phase == "Failed" then
  hs.status = "Degraded"
  if ready == nil or ready.message == nil or ready.message == "" then
    hs.message = (stalled and stalled.message) or "the FineTuneJob failed"
  end
elseif ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
elseif status.phase == "Suspended" or status.phase == "Queued" then
  hs.status = "Suspended"
end
return hs
