-- Argo CD health check for QLoRAFinetune (qlora.io/v1alpha1).
-- Install it under the key resource.customizations.health.qlora.io_QLoRAFinetune of argocd-cm (docs/gitops.md).
--
--   Pending, Running            -> Progressing  (message: progress, loss, ETA when known)
--   Succeeded                   -> Healthy      (message: where the adapter is)
--   Failed                      -> Degraded     (message: the failure reason and what to do)
--   Suspended                   -> Suspended
--   Unknown                     -> Unknown      (the Job is gone and its outcome unknown: look at the volume)
--   no status yet, or a status older than the spec -> Progressing (the operator has not caught up)
local hs = {}

local function condition(status, type)
  if status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == type then
      return c
    end
  end
  return nil
end

-- One line from the parts that are set, e.g. "42% (step 84/200), loss 1.234, ETA 3m12s".
local function progress_line(status)
  local parts = {}
  if status.progress ~= nil then
    local p = status.progress
    if status.step ~= nil and status.totalSteps ~= nil then
      p = p .. " (step " .. tostring(status.step) .. "/" .. tostring(status.totalSteps) .. ")"
    end
    table.insert(parts, p)
  end
  if status.loss ~= nil then
    table.insert(parts, "loss " .. tostring(status.loss))
  end
  if status.eta ~= nil then
    table.insert(parts, "ETA " .. status.eta)
  end
  return table.concat(parts, ", ")
end

local status = obj.status
if status == nil or status.phase == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the qlora-operator to pick up the run"
  return hs
end

local generation = obj.metadata and obj.metadata.generation
if generation ~= nil and status.observedGeneration ~= nil and status.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the qlora-operator to observe generation " .. tostring(generation)
  return hs
end

local phase = status.phase
if phase == "Succeeded" then
  hs.status = "Healthy"
  if status.outputPath ~= nil then
    hs.message = "Fine-tune succeeded; adapter at " .. status.outputPath
  else
    hs.message = status.message or "Fine-tune succeeded"
  end
elseif phase == "Failed" then
  hs.status = "Degraded"
  local c = condition(status, "Succeeded")
  local reason = (c ~= nil and c.reason) or nil
  local message = status.message or (c ~= nil and c.message) or nil
  if reason ~= nil and message ~= nil then
    hs.message = reason .. ": " .. message
  else
    hs.message = reason or message or "Fine-tune failed"
  end
elseif phase == "Suspended" then
  hs.status = "Suspended"
  hs.message = status.message or "Fine-tune suspended (spec.suspend is true)"
elseif phase == "Unknown" then
  hs.status = "Unknown"
  hs.message = status.message or "The Job is gone and the run's outcome is unknown"
else
  -- Pending, Running, and any phase a newer operator may add.
  hs.status = "Progressing"
  local line = progress_line(status)
  if line ~= "" then
    hs.message = phase .. ": " .. line
  else
    hs.message = status.message or phase
  end
end
return hs
